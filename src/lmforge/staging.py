"""Write a folder atomically: build it beside its destination, move it in only when whole.

Every folder lmforge writes goes through `staged`: prepared data, task files, exports, imports,
run folders and each checkpoint. A kill at any moment leaves either the previous folder or the
new one, never a mix; what is left of an unfinished staging folder is hidden (`.tmp-NAME-*`) and
removed by the next save of the same NAME. A staging folder is locked (flock on the folder) while
its process fills it, so that a save beside it never removes one in use.

Every user-named output folder also carries a marker (`.lmforge`: its kind and lmforge's version),
written inside the staging folder so that it arrives with the folder. `check_out` is the one rule
for replacing an output folder, used by every command: lmforge replaces only a folder it wrote,
of the same kind, with --overwrite, and never the working folder, the home folder, the command's
input or any folder that contains one of them.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from lmforge import __version__
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
STAGING_PREFIX = ".tmp-"
RETIRED = re.compile(
    re.escape(STAGING_PREFIX) + r"(.+)-old-\d+"
)  # `_replace`'s name for the output it replaces
MARKER = ".lmforge"  # hidden: HF loaders, globbing and `prepare` of a folder all pass it by

Kind = Literal["run", "data", "tasks", "export", "import", "inspect", "compare"]
KIND_NAMES: dict[str, str] = {
    "run": "run folder",
    "data": "prepared data folder",
    "tasks": "task folder",
    "export": "Hugging Face export",
    "import": "imported run",
    "inspect": "inspection report",
    "compare": "comparison sheet",
}
REPLACE_HINT = "pass --overwrite to replace it"
STALE_AFTER_S = 60.0  # a staging folder younger than this is never taken for one left behind
LOCK_FILE = ".lock"  # in a folder that one process at a time may write (a training run's)


def write_marker(folder: Path, kind: Kind) -> None:
    """Mark `folder` as written by lmforge, so that a later --overwrite may replace it."""
    (folder / MARKER).write_text(json.dumps({"kind": kind, "version": __version__}) + "\n")


def folder_kind(folder: Path) -> str | None:
    """The kind of lmforge folder `folder` is, or None when lmforge did not write it."""
    marker = folder / MARKER
    if not marker.exists():
        return _kind_before_markers(folder)
    try:
        kind = json.loads(marker.read_text())["kind"]
    except (OSError, ValueError, TypeError, KeyError):
        return None  # a marker that cannot be read proves nothing
    return kind if kind in KIND_NAMES else None


def _kind_before_markers(folder: Path) -> str | None:
    """Folders written before lmforge had markers, told apart by files that only lmforge puts
    together; anything else without a marker is the user's. Task folders and exports are not
    recognised: their files (train.jsonl, config.json) are what users write by hand too."""
    if (folder / "checkpoints").is_dir() and (folder / "config.toml").is_file():
        return "run"  # an imported run looks the same; it counts as a run
    if (folder / "meta.json").is_file() and (folder / "train.bin").is_file():
        return "data"
    return None


def check_out(
    out: Path, kind: Kind, overwrite: bool, *, inputs: Iterable[Path] = (), hint: str = REPLACE_HINT
) -> None:
    """Refuse, touching nothing, an `out` folder that this command may not fill or replace.

    A missing or empty folder is filled; a non-empty one is replaced only with `overwrite` and
    only when lmforge wrote it as the same `kind`. Never the working folder, the home folder,
    one of `inputs`, or a folder that contains any of them (paths compared resolved). `hint`
    says what to pass to go ahead when `out` is merely not empty.
    """
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} exists and is not a folder")
    if (reason := _never_replaced(out.resolve(), inputs)) is not None:
        raise LmforgeError(f"--out {out} {reason}; lmforge never replaces it: choose another folder")
    # The lock file is the running command's own (see `locked`), not content of the folder.
    if not out.is_dir() or all(entry.name == LOCK_FILE for entry in out.iterdir()):
        return
    if not overwrite:
        raise LmforgeError(f"--out {out} exists and is not empty; {hint}")
    held = folder_kind(out)
    if held is None:
        raise LmforgeError(
            f"--out {out} was not written by lmforge (no {MARKER} marker), so --overwrite does not "
            "replace it: choose another folder, or empty it yourself"
        )
    if held != kind:
        raise LmforgeError(
            f"--out {out} holds an lmforge {KIND_NAMES[held]}, not {_a(KIND_NAMES[kind])}; "
            "--overwrite replaces only a folder of the same kind"
        )


def _never_replaced(out: Path, inputs: Iterable[Path]) -> str | None:
    """Why the resolved folder `out` must never be replaced, or None."""
    protected = [(Path.cwd().resolve(), "the working folder")]
    try:
        protected.append((Path.home().resolve(), "the home folder"))
    except RuntimeError:  # no HOME and no password entry: nothing to protect there
        pass
    protected += [(Path(path).resolve(), f"the input {path}") for path in inputs]
    for path, name in protected:
        if out == path:
            return f"is {name}"
        if out in path.parents:
            return f"contains {name}"
    return None


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


@contextmanager
def staged(final: Path, durable: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside `final`; if the body succeeds it replaces `final`, else it vanishes.

    `durable` fsyncs every file and the parent folder before returning, so the new folder
    survives a power loss too (checkpoints); outputs that can be rebuilt skip the cost.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final.parent, name=final.name)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{STAGING_PREFIX}{final.name}-"))
    in_use = _lock_folder(staging)  # released when this process ends, however it ends
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
        os.close(in_use)


@contextmanager
def staged_folder(out: Path, kind: Kind, overwrite: bool, *, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """`staged` for a user-named `--out` folder, checked by `check_out` and marked as `kind`."""
    inputs = tuple(inputs)
    check_out(out, kind, overwrite, inputs=inputs)
    with staged(out) as staging:
        write_marker(staging, kind)
        yield staging


def remove_stale_staging(parent: Path, *, name: str | None = None, owned: bool = False) -> None:
    """Delete staging folders left by processes killed while writing. In a folder that one process
    at a time writes (`owned`: a run's checkpoints, under the run's lock) that is every one. Elsewhere
    only output `name`'s (`.tmp-NAME-*`: a hidden folder of the user's or another tool's is not
    lmforge's to delete), and of those only the ones no process holds locked, made over a minute ago
    (where folders cannot be locked, NFS for one, none: a live one cannot be told apart). A retired
    output (`_replace` killed between its two renames) is the only copy of it while the output is
    missing: it is kept then."""
    pattern = f"{STAGING_PREFIX}*" if name is None else f"{STAGING_PREFIX}{glob.escape(name)}-*"
    for stale in parent.glob(pattern):
        retired = RETIRED.fullmatch(stale.name)
        if retired and not (parent / retired.group(1)).exists():
            continue
        if owned or _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)


def _abandoned(staging: Path) -> bool:
    """Whether no process holds `staging` locked, and it is old enough to have been locked by now
    (between mkdtemp and flock a live folder is unlocked for a moment)."""
    try:
        fd = os.open(staging, os.O_RDONLY)
    except OSError:  # removed meanwhile, or not a folder
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < STALE_AFTER_S:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # the lock goes with the fd; rmtree follows at once
    except OSError:  # held by its process (BlockingIOError), or no locks on this file system
        return False
    finally:
        os.close(fd)


def _lock_folder(folder: Path) -> int:
    """Open `folder` and hold an exclusive flock on it (where the file system has locks); the fd."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: the folder is then never removed as stale
        pass
    return fd


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
    created, lock_existed = not folder.exists(), (folder / LOCK_FILE).exists()
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
            logger.warning(
                f"{folder}: cannot lock {LOCK_FILE} ({exc.strerror}); "
                f"nothing stops a second process from writing this folder"
            )
        try:
            yield
        finally:
            _remove_lock_left_alone(folder, created, lock_existed)


def is_locked(folder: Path) -> bool:
    """Whether a process holds FOLDER/.lock now (a training run in progress). Trying the lock takes
    a few microseconds, during which a `train` starting in that folder would be refused."""
    try:
        lock = open(folder / LOCK_FILE)  # never created here
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing can be told
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def _remove_lock_left_alone(folder: Path, created: bool, lock_existed: bool) -> None:
    """Leave no trace where the command wrote nothing: a folder made for the lock alone goes, and
    so does a new lock in a folder that lmforge did not write (one it refused, such as `.`)."""
    if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
        (folder / LOCK_FILE).unlink()
        folder.rmdir()
    elif not lock_existed and not (folder / MARKER).exists():
        (folder / LOCK_FILE).unlink(missing_ok=True)


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
