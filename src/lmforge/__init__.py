"""lmforge: train and optimize GPT-style language models with PyTorch."""

from importlib.metadata import PackageNotFoundError, version

import lmforge.output  # noqa: F401  (the "lmforge" logger's handler, before any module logs)

try:
    __version__ = version("lmforge")  # pyproject.toml's, as installed: the one place it is written
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
