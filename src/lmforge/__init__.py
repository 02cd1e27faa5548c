"""lmforge: train and optimize GPT-style language models with PyTorch."""

__version__ = "0.1.0"
