"""Records from the files people keep data in, each with the place it came from.

JSON Lines, JSON arrays, CSV, TSV and Parquet files, and Hugging Face datasets (`datasets.load_dataset`:
a hub id, a local folder of data files, or a folder written by `save_to_disk`), all read as one stream
of `Row`s: where the record is (`file:line`, or `file: row N` where a file has no lines to speak of)
and how to load it. A record that cannot be decoded raises ValueError from `Row.load`, so a reader
can skip it (`data.on_bad_line = "skip"`) as it skips a record of the wrong shape. Files are read a
line or a batch at a time (JSON arrays whole: they have no record boundaries before parsing).
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.files import file_suffix
from lmforge.jsonl import MAX_LINE_BYTES, decode_line, loads, read_lines

# Record files by suffix; the suffix decides how a file is read.
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 1024  # rows decoded at once: memory stays bounded whatever the file's size
_JSON_SPACE = " \t\n\r"


@dataclass(frozen=True)
class Row:
    """One record: where it is, for messages, and a call that returns it (ValueError if it is bad)."""

    where: str
    load: Callable[[], object]


def file_type(path: Path) -> str | None:
    """The record file type of `path` by its suffix (jsonl, json, csv, tsv, parquet), else None."""
    return FILE_TYPES.get(file_suffix(path))


def read_rows(path: Path, *, invalid_utf8: str = "error", kind: str | None = None) -> Iterator[Row]:
    """The records of a .jsonl, .json, .csv, .tsv or .parquet file (or a file of `kind`), in file order."""
    kind = kind or file_type(path)
    if kind is None:
        raise LmforgeError(f"{path}: unknown file type {path.suffix!r} (expected {', '.join(FILE_TYPES)})")
    if not path.is_file():
        raise LmforgeError(f"{path}: not found")
    if kind == "parquet":
        return _parquet_rows(path)
    if kind == "tsv":
        return _csv_rows(path, invalid_utf8=invalid_utf8, delimiter="\t")
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}
    return readers[kind](path, invalid_utf8=invalid_utf8)


def _jsonl_rows(path: Path, *, invalid_utf8: str) -> Iterator[Row]:
    errors = "replace" if invalid_utf8 == "replace" else "strict"
    for line_no, raw in read_lines(path):
        if raw.strip():
            yield Row(f"{path}:{line_no}", lambda raw=raw: loads(decode_line(raw, errors)))


def _json_rows(path: Path, *, invalid_utf8: str) -> Iterator[Row]:
    """The elements of a JSON array (Alpaca's `alpaca_data.json`), each with the line it starts on."""
    text = _read_text(path, invalid_utf8)
    decoder, line, counted = json.JSONDecoder(), 1, 0
    i = _skip_space(text, 0)
    if not text.startswith("[", i):
        raise LmforgeError(f"{path}: expected a JSON array of records (or use .jsonl for JSON Lines)")
    i = _skip_space(text, i + 1)
    while not text.startswith("]", i):
        line, counted = line + text.count("\n", counted, i), i
        try:
            record, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError) as exc:  # a broken array cannot be read on past the error
            raise LmforgeError(f"{path}:{line}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        yield Row(f"{path}:{line}", lambda record=record: record)
        i = _skip_space(text, i)
        if text.startswith(",", i):
            i = _skip_space(text, i + 1)
        elif not text.startswith("]", i):
            line += text.count("\n", counted, i)
            raise LmforgeError(f"{path}:{line}: expected ',' or ']' between the array's records")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_SPACE:
        i += 1
    return i


def _read_text(path: Path, invalid_utf8: str) -> str:
    if path.stat().st_size > 4 * MAX_LINE_BYTES:
        raise LmforgeError(f"{path}: a JSON array this large is read whole; convert it to .jsonl")
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a byte order mark is no JSON
        return data.decode("utf-8", errors="replace" if invalid_utf8 == "replace" else "strict")
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path}: invalid UTF-8 at byte {exc.start}") from None


def _csv_rows(path: Path, *, invalid_utf8: str, delimiter: str = ",") -> Iterator[Row]:
    """Rows of a CSV (or, with delimiter tab, TSV) file with a header line, as {column: text}."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))  # a long prompt is one field
    errors = "replace" if invalid_utf8 == "replace" else "strict"
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark, no part of the first column's name
    with open(path, encoding="utf-8-sig", errors=errors, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise LmforgeError(f"{path}: empty (expected a header line naming the columns)")
            start = reader.line_num + 1
            for fields in reader:
                if any(fields):
                    yield Row(f"{path}:{start}", lambda fields=fields: _csv_record(header, fields))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise LmforgeError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise LmforgeError(
                f"{path}: invalid UTF-8 near line {reader.line_num + 1} ({exc.reason})"
            ) from None


def _csv_record(header: list[str], fields: list[str]) -> dict[str, str]:
    if len(fields) != len(header):
        raise ValueError(f"{len(fields)} fields where the header has {len(header)}")
    return dict(zip(header, fields))


def _parquet_rows(path: Path) -> Iterator[Row]:
    pq = _import("pyarrow.parquet", "pyarrow")
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError: not a Parquet file
        raise LmforgeError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            number += 1
            yield Row(f"{path}: row {number}", lambda record=record: record)


def hf_rows(name: str, *, split: str, config: str = "", streaming: bool = False) -> Iterator[Row]:
    """The records of split `split` of a Hugging Face dataset: a hub id (from the local cache when
    LMFORGE_OFFLINE=1 or HF_HUB_OFFLINE=1), a local folder of data files, or a `save_to_disk` folder.
    `streaming` reads a hub dataset record by record, never holding it whole."""
    dataset = open_hf(name, split=split, config=config, streaming=streaming)
    for number, record in enumerate(dataset, start=1):
        yield Row(f"{name}[{split}]: row {number}", lambda record=record: record)


def open_hf(name: str, *, split: str, config: str = "", streaming: bool = False) -> Any:
    """`datasets.load_dataset(name, config, split=split)` (or `load_from_disk`), errors as one line."""
    datasets = _import("datasets", "datasets")
    if os.environ.get("LMFORGE_OFFLINE") == "1":
        datasets.config.HF_HUB_OFFLINE = True  # the hub's files come from the cache, or not at all
    local = Path(name).expanduser()
    saved_split = None  # a save_to_disk folder of one Dataset: the split it is
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
            else:  # the split it was loaded as, else the train split (`load_dataset` names a lone one so)
                saved_split = str(dataset.split) if dataset.split is not None else "train"
        else:
            dataset = datasets.load_dataset(
                str(local) if local.is_dir() else name, config or None, split=split, streaming=streaming
            )
    except KeyError:
        raise LmforgeError(f"Hugging Face dataset {name!r}: no split {split!r}") from None
    except Exception as exc:  # datasets raises many kinds: not found, offline, bad config or split
        reason = " ".join(str(exc).split())[:300]
        raise LmforgeError(
            f"Hugging Face dataset {name!r} (split {split!r}): cannot load ({type(exc).__name__}: {reason})"
        ) from None
    if saved_split not in (None, split):  # else it would be read again as another split, e.g. validation
        raise LmforgeError(
            f"Hugging Face dataset {name!r}: one split ({saved_split!r}) saved with save_to_disk, "
            f"no split {split!r}"
        )
    return dataset


def _import(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise LmforgeError(f"reading this data needs {package}: pip install 'lmforge[data]'") from None
