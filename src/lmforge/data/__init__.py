"""Raw text → tokenizer → memory-mapped token shards, and the loaders that read them back."""

from lmforge.data.loader import PreparedData, RandomWindows, eval_windows
from lmforge.data.prepare import prepare

__all__ = ["PreparedData", "RandomWindows", "eval_windows", "prepare"]
