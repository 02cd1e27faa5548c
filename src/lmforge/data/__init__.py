"""Raw text → tokenizer → memory-mapped token shards, the loaders that read them back, and the
TrainingData protocol that every kind of training data satisfies."""

from lmforge.data.loader import PreparedData, RandomWindows, eval_windows
from lmforge.data.prepare import prepare
from lmforge.data.protocol import Batch, Batches, TrainingData

__all__ = ["Batch", "Batches", "PreparedData", "RandomWindows", "TrainingData", "eval_windows", "prepare"]
