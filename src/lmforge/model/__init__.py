"""The Transformer, its output heads and LoRA adapters."""

from lmforge.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
