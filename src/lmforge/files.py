"""Files on disk that several layers share: the hash that verifies a file, the cache folder, and
how a file's suffix is read.

Data verifies its downloads and checkpoints verify their files with the same `file_sha256`; the
datasets and the matmul peaks that `runtime` measures are kept under the same `cache_dir`. Every
suffix that says how a file is read (`.txt`, `.jsonl`, `.gz`, ...) is matched without case, through
`file_suffix` and `gzipped_suffix`: `NOTES.TXT` is a text file as `notes.txt` is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

GZIP_SUFFIX = ".gz"


def cache_dir() -> Path:
    """Where downloaded datasets are kept (`$LMFORGE_CACHE_DIR`, else the XDG cache)."""
    if value := os.environ.get("LMFORGE_CACHE_DIR"):
        return Path(value)
    # the XDG rules: an empty or relative $XDG_CACHE_HOME is invalid and ignored, not a folder below
    # wherever lmforge happens to run
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "")
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "lmforge"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_suffix(path: Path) -> str:
    """`path`'s last suffix in lower case (`.TXT` -> `.txt`): what decides how a file is read."""
    return path.suffix.lower()


def gzipped_suffix(path: Path) -> str | None:
    """The suffix of the file that a gzipped file holds (`.txt` of `notes.TXT.GZ`), lower case; None
    when `path` is not gzipped."""
    return file_suffix(Path(path.stem)) if file_suffix(path) == GZIP_SUFFIX else None
