"""Write a folder atomically: build it beside its destination, move it in only when whole.

Every folder lmforge writes goes through `staged`: prepared data, task files, exports, imports
and each checkpoint. A kill at any moment leaves either the previous folder or the new one,
never a mix; what is left of an unfinished staging folder is hidden (`.tmp-NAME-*`) and
removed by the next save into the same parent.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LmforgeError

STAGING_PREFIX = ".tmp-"
LOCK_FILE = ".lock"  # in a folder that one process at a time may write (a training run's)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder (or a file) unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LmforgeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staged(final: Path, durable: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside `final`; if the body succeeds it replaces `final`, else it vanishes.

    `durable` fsyncs every file and the parent folder before returning, so the new folder
    survives a power loss too (checkpoints); outputs that can be rebuilt skip the cost.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{STAGING_PREFIX}{final.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the folder's mode
    try:
        yield staging
        if durable:
            for file in staging.rglob("*"):
                if file.is_file():
                    _fsync(file)
        _replace(staging, final)
        if durable:
            _fsync(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """`staged` for a user-named `--out` folder: a non-empty one is replaced only with `overwrite`."""
    check_out(out, overwrite)
    with staged(out) as staging:
        yield staging


def remove_stale_staging(parent: Path) -> None:
    """Delete staging folders left by a process killed while writing."""
    for stale in parent.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def locked(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on FOLDER/.lock (creating the folder) while the body runs; if another
    process holds it, stop at once with an error. The lock dies with its process, even on kill -9;
    a file system that has no locks gets a warning.

    A folder made here that holds nothing but the lock at the end (its writer failed before
    writing anything) is removed again.
    """
    if not enabled:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise LmforgeError(f"--out {folder} exists and is not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LmforgeError(
                f"{folder} is in use by another lmforge process (it holds {folder / LOCK_FILE}); "
                f"wait for that one to end, or stop it"
            ) from None
        except OSError as exc:  # a file system without locks (Lustre without -o flock, ...): go on unguarded
            print(
                f"warning: {folder}: cannot lock {LOCK_FILE} ({exc.strerror}); "
                f"nothing stops a second process from writing this folder",
                file=sys.stderr,
            )
        try:
            yield
        finally:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                (folder / LOCK_FILE).unlink()
                folder.rmdir()


def disk_full(exc: BaseException) -> str | None:
    """Why a write failed if the disk is full: "no space left on device" or "disk quota exceeded",
    reported by `exc` or an error behind it; else None. Python's writes raise OSError with the errno;
    safetensors' writer and DCP's report of a failed rank carry it only in their text."""
    while exc is not None:
        for code in (errno.ENOSPC, errno.EDQUOT):
            if (isinstance(exc, OSError) and exc.errno == code) or os.strerror(code) in str(exc):
                return os.strerror(code).lower()
        exc = exc.__cause__ or exc.__context__
    return None


def _replace(staging: Path, final: Path) -> None:
    if not final.exists():
        os.replace(staging, final)
        return
    retired = final.with_name(f"{STAGING_PREFIX}{final.name}-old-{os.getpid()}")
    os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
