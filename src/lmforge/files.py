"""Files on disk that several layers share: the hash that verifies a file, and the cache folder.

Data verifies its downloads and checkpoints verify their files with the same `file_sha256`; the
datasets and the matmul peaks that `runtime` measures are kept under the same `cache_dir`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where downloaded datasets are kept (`$LMFORGE_CACHE_DIR`, else the XDG cache)."""
    if value := os.environ.get("LMFORGE_CACHE_DIR"):
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
