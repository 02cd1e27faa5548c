"""Reading a DCP folder (a checkpoint's `train_state/`) without trusting it.

DCP's own reader unpickles `.metadata` with plain `pickle`, and its default planner loads every
non-tensor item with `torch.load(weights_only=False)`: a crafted checkpoint would run any code it
likes on resume, and the sha256 list in meta.json cannot prevent it, since whoever wrote the folder
can rewrite that too. Here the metadata goes through an unpickler that admits only what DCP
metadata is made of, every item is loaded with `torch.load(weights_only=True)` (as DCP already
does for tensors), and the shard files the metadata names must lie in the folder itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from lmforge.errors import LmforgeError

METADATA = ".metadata"  # written by the coordinating rank; `__RANK.metadata` without coordination

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# The globals in the metadata of every checkpoint lmforge writes (recorded over strategies, optimizers
# and dtypes), besides pickle's own dicts, lists, tuples, strings and numbers. Each is a dataclass,
# an enum or a constructor without side effects; nothing else is ever looked up.
ALLOWED_GLOBALS = frozenset(
    {
        *(
            (_METADATA_MODULE, name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # how a torch.layout pickles: looked up by name
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
    }
)


class _Refused(Exception):
    """A global outside ALLOWED_GLOBALS: the pickle is not DCP metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:  # checked before anything is imported or called
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def read_metadata(folder: Path) -> Metadata:
    """The DCP metadata of `folder`; a one-line LmforgeError naming the file if it is anything else."""
    return _load_metadata(folder / METADATA)


def _load_metadata(path: Path) -> Metadata:
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except _Refused as exc:
        raise LmforgeError(f"{path}: refused to unpickle {exc}, which DCP metadata never holds") from None
    except Exception as exc:  # a damaged pickle can raise nearly anything
        raise LmforgeError(f"{path}: not readable DCP metadata ({first_line(exc)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise LmforgeError(f"{path}: not DCP metadata (a pickled {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not _is_file_name(name):
            raise LmforgeError(f"{path}: names a shard outside its folder ({name!r})")
    return metadata


def _is_file_name(name: object) -> bool:
    """A plain file name: no folder part, so reads stay inside the checkpoint."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def root_error(exc: BaseException) -> BaseException:
    """The error behind DCP's CheckpointException (the first failed rank's), or `exc` itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))[0]  # (exception, traceback) per failed rank
    return exc


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message` of the error behind `exc`."""
    exc = root_error(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, reading the metadata with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = _load_metadata(Path(self.path) / (METADATA if rank is None else f"__{rank}{METADATA}"))
        if metadata.storage_meta is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _reason(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to: the line among its advice that says it."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(advice)), first_line(exc))


class RefusedItem(LmforgeError):
    """A non-tensor item that is not plain data."""


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items (optimizer settings, ...) are loaded with
    `torch.load(weights_only=True)`: plain data only, no code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            item = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise RefusedItem(f"refused to load {fqn}, which is not plain data ({_reason(exc)})") from None
        if self.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does with the item
            set_element(self.original_state_dict, self.mappings[fqn], item)
        else:
            self.state_dict[fqn] = item
