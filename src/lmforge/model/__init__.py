"""The Transformer and autoregressive generation."""

from lmforge.model.generate import generate
from lmforge.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "generate"]
