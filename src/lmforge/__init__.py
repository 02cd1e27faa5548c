"""lmforge: train and optimize GPT-style language models with PyTorch."""

import lmforge.output  # noqa: F401  (the "lmforge" logger's handler, before any module logs)

__version__ = "0.1.0"
