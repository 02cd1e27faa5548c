"""Where text comes from: files, folders and named datasets, read as a stream of documents.

A corpus is a sorted list of files. Each `.txt`/`.md`/`.raw`/`.text` file is one document;
each record of a `.jsonl`, `.json`, `.csv`, `.tsv` or `.parquet` file is one document (its `text`
column, or the one `--text-column` names), as is each record of a Hugging Face dataset streamed with
`hf:NAME`; a named dataset may hold many documents per file, each ended by a separator line, and may
come split into train and val files. Any other file type is refused unless `--format` says how to read it.
Documents are read in chunks of about `CHUNK_BYTES`, cut after a newline where possible (gzipped
files are decompressed on the fly), so memory stays bounded whatever the size of a file.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import itertools
import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmforge.data.records import FILE_TYPES, Row, file_type, hf_rows, read_rows
from lmforge.errors import LmforgeError
from lmforge.files import cache_dir, file_sha256, file_suffix, gzipped_suffix
from lmforge.jsonl import decode_line, loads, read_lines

logger = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 16  # small enough that encode_batch spreads a batch over all cores
DEFAULT_DOWNLOAD_TIMEOUT_S = 600.0  # a whole download; TinyShakespeare (1 MB) needs seconds
DOWNLOAD_BLOCK_BYTES = 1 << 16
TEXT_SUFFIXES = (".txt", ".md", ".raw", ".text")
JSONL_SUFFIXES = (".jsonl",)
RECORD_SUFFIXES = tuple(FILE_TYPES)  # one document per record: .jsonl, .json, .csv, .tsv, .parquet
# How `prepare --format` reads INPUT: auto (by each file's suffix), text, or one record file type
INPUT_FORMATS = ("auto", "text", *FILE_TYPES.values())
HF_PREFIX = "hf:"  # INPUT "hf:org/name" (or hf:PATH): a Hugging Face dataset, streamed
DEFAULT_TEXT_COLUMN = "text"


@dataclass(frozen=True)
class NamedDataset:
    """One pinned file of a public text corpus that `lmforge prepare NAME` finds locally or downloads."""

    name: str
    filename: str
    url: str | None  # None: no public copy to download; found only in $LMFORGE_DATA_DIR or the cache
    sha256: str  # of the file as stored (gzipped or not)
    size: int
    split: str | None = None  # "train" or "val" when the corpus comes split; None: prepare splits it
    document_end: str | None = None  # a line that ends each document inside the file; None: one document


GUTENBERG_EOT = "<|endoftext|>"  # the line after each book of the gutenberg files

# Every file of each named dataset, in corpus order.
NAMED_DATASETS: dict[str, tuple[NamedDataset, ...]] = {
    "tinyshakespeare": (
        NamedDataset(
            name="tinyshakespeare",
            filename="input.txt",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1_115_394,
        ),
    ),
    # 401 cleaned English Project Gutenberg books, split by book by its authors (SOURCE.md beside it).
    "gutenberg": (
        NamedDataset(
            name="gutenberg",
            filename="train.txt.gz",
            url=None,
            sha256="64af930fe953337fef426dd9c136e72155ae25b6ccd78b80c4ab4100b497b6e0",
            size=56_707_846,
            split="train",
            document_end=GUTENBERG_EOT,
        ),
        NamedDataset(
            name="gutenberg",
            filename="valid.txt.gz",
            url=None,
            sha256="4bbf5dc78fa7fd0b5740b78c51e4c5797956c1513c2ec257f422ffd72d25e174",
            size=773_645,
            split="val",
            document_end=GUTENBERG_EOT,
        ),
    ),
    # WikiText-2 (raw) as an evaluation corpus: its train file is not in the shared folder, so the
    # given split is validation -> train.bin and test -> val.bin, and `lmforge eval --data` scores the
    # whole test file. Files of pytorch/examples at the commit that added them (SOURCE.md beside them).
    "wikitext-2": tuple(
        NamedDataset(
            name="wikitext-2",
            filename=filename,
            url="https://raw.githubusercontent.com/pytorch/examples/cf74c81ec00256a9511c054aaf0b3f62cd3aa62d/"
            f"word_language_model/data/wikitext-2/{upstream}",
            sha256=sha256,
            size=size,
            split=split,
        )
        for filename, upstream, sha256, size, split in (
            (
                "wiki.valid.raw",
                "valid.txt",
                "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
                1_146_846,
                "train",
            ),
            (
                "wiki.test.raw",
                "test.txt",
                "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
                1_290_590,
                "val",
            ),
        )  # fmt: skip
    ),
}


SST2_URL = (  # GLUE's SST-2 TSVs as committed to a public repository (GLUE's own SST-2.zip has no pin)
    "https://raw.githubusercontent.com/brunnurs/binary-classification-bert/"
    "35e1628db50472679176dd31b992534a3866a86e/data/SST2/"
)
MULTI30K_URL = (  # the official repository, at the commit the shared copy comes from
    "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
)
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"  # the official SQuAD site


def _pinned(folder: str, filename: str, sha256: str, *, size: int, url: str | None) -> NamedDataset:
    return NamedDataset(name=folder, filename=filename, url=url and url + filename, sha256=sha256, size=size)


# The files `lmforge tasks prepare` reads, by folder: looked for in $LMFORGE_DATA_DIR/FOLDER, then
# the cache, else downloaded (each folder's SOURCE.md in the shared data gives these values).
TASK_DATASETS: dict[str, tuple[NamedDataset, ...]] = {
    "sst2": tuple(
        _pinned("sst2", name, sha, size=size, url=SST2_URL)
        for name, sha, size in (
            ("train.tsv", "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2", 3_806_075),
            ("dev.tsv", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", 94_931),
        )
    ),
    "multi30k": tuple(
        _pinned("multi30k", name, sha, size=size, url=MULTI30K_URL)
        for name, sha, size in (
            ("train.en.gz", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f", 568_929),
            ("train.de.gz", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6", 637_044),
            ("val.en.gz", "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28", 21_650),
            ("val.de.gz", "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a", 24_681),
            (
                "test_2016_flickr.en.gz",
                "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
                21_077,
            ),
            (
                "test_2016_flickr.de.gz",
                "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
                22_890,
            ),
        )
    ),
    "squad-v1.1": (
        # The official files; the shared folder holds dev gzipped (`gzip -9 -n`), which counts too.
        _pinned(
            "squad-v1.1",
            "dev-v1.1.json",
            "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
            size=4_854_279,
            url=SQUAD_URL,
        ),
        _pinned(
            "squad-v1.1",
            "dev-v1.1.json.gz",
            "5ef5752d50566ab538501116de1508326eefb6bf70026def7915309f30822727",
            size=1_033_885,
            url=None,
        ),
        # Not in the shared folder; its pin is the one ParlAI and the LFS pointer in
        # github.com/salmedina/SQuAD give (their dev-v1.1.json pin is the one above).
        _pinned(
            "squad-v1.1",
            "train-v1.1.json",
            "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
            size=30_288_272,
            url=SQUAD_URL,
        ),
    ),
    # CrowS-Pairs (`lmforge eval --task crows-pairs`), from the authors' repository at a fixed commit.
    "crows-pairs": (
        _pinned(
            "crows-pairs",
            "crows_pairs_anonymized.csv",
            "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c",
            size=437_764,
            url="https://raw.githubusercontent.com/nyu-mll/crows-pairs/8aaac11c485473159ec9328a65253a5be9a479dc/data/",
        ),
    ),
}


def task_dataset(folder: str, filename: str) -> NamedDataset:
    """The pin of one file of TASK_DATASETS."""
    return next(d for d in TASK_DATASETS[folder] if d.filename == filename)


def task_file(folder: str, filename: str, *same_content: str, root: Path | None = None) -> Path:
    """A task's file (or the same content under another name), found or downloaded, verified."""
    others = [task_dataset(folder, name) for name in same_content]
    return resolve_named_dataset(task_dataset(folder, filename), *others, root=root)


def data_dir() -> Path | None:
    """The folder of local named datasets (`$LMFORGE_DATA_DIR`), if set."""
    value = os.environ.get("LMFORGE_DATA_DIR")
    return Path(value) if value else None


def cached_path(dataset: NamedDataset) -> Path:
    """Where a download of the pinned file is kept."""
    return cache_dir() / "datasets" / dataset.name / dataset.filename


def local_copy(dataset: NamedDataset, root: Path | None = None) -> Path | None:
    """The verified copy of a pinned file in `root` (default `$LMFORGE_DATA_DIR`), else in the cache;
    None when neither holds it. A copy whose sha256 differs from the pin is an error, never skipped."""
    root = root if root is not None else data_dir()
    places = ([root / dataset.name / dataset.filename] if root is not None else []) + [cached_path(dataset)]
    for path in places:
        if path.is_file():
            _verify(path, dataset)
            return path
    return None


def resolve_named_dataset(
    dataset: NamedDataset, *same_content: NamedDataset, root: Path | None = None
) -> Path:
    """Find a pinned file in `root` (default `$LMFORGE_DATA_DIR`), then the cache, else download and
    verify it. `same_content`: the same data stored otherwise (e.g. gzipped), also looked for locally;
    the first candidate with a public URL is the one downloaded."""
    candidates = (dataset, *same_content)
    for candidate in candidates:
        if (found := local_copy(candidate, root)) is not None:
            return found
    where = f"{root or '$LMFORGE_DATA_DIR'}/{dataset.name} or {cached_path(dataset).parent}"
    downloadable = next((c for c in candidates if c.url is not None), None)
    if downloadable is None:
        raise LmforgeError(
            f"dataset {dataset.name!r}: {dataset.filename} is not in {where}, and it has no public download"
        )
    if os.environ.get("LMFORGE_OFFLINE") == "1":
        raise LmforgeError(
            f"dataset {dataset.name!r}: {downloadable.filename} is not in {where} "
            "and LMFORGE_OFFLINE=1 forbids downloading it"
        )
    _download(downloadable, cached_path(downloadable))
    return cached_path(downloadable)


def _verify(path: Path, dataset: NamedDataset) -> None:
    actual = file_sha256(path)
    if actual != dataset.sha256:
        raise LmforgeError(
            f"{path}: sha256 {actual} does not match the pinned {dataset.sha256} of {dataset.name!r}"
        )


class DownloadError(LmforgeError):
    """The network failed a download (not a file that arrived with the wrong size or sha256)."""


def download_timeout() -> float:
    """Seconds a whole download may take: `$LMFORGE_DOWNLOAD_TIMEOUT`, else the default."""
    text = os.environ.get("LMFORGE_DOWNLOAD_TIMEOUT")
    if text is None:
        return DEFAULT_DOWNLOAD_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise LmforgeError(f"LMFORGE_DOWNLOAD_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def _download(dataset: NamedDataset, target: Path) -> None:
    timeout = download_timeout()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target, timeout)
    logger.info(f"downloading {dataset.name} from {dataset.url}")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(dataset, out, time.monotonic() + timeout, timeout=timeout)
        actual = file_sha256(tmp)
        if actual != dataset.sha256:
            raise LmforgeError(
                f"download of {dataset.name!r} from {dataset.url} has sha256 {actual}, "
                f"expected {dataset.sha256}"
            )
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as exc:  # IncompleteRead is an HTTPException, not OSError
        raise DownloadError(
            f"could not download {dataset.name!r} from {dataset.url}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(dataset: NamedDataset, out: BinaryIO, deadline: float, *, timeout: float) -> None:
    """Copy the response into `out`, never past the pinned size nor the deadline."""
    received = 0
    with urllib.request.urlopen(dataset.url, timeout=min(60.0, timeout)) as response:
        while True:
            if time.monotonic() > deadline:
                raise LmforgeError(
                    f"download of {dataset.name!r} from {dataset.url} took longer than {timeout:g} s "
                    "(LMFORGE_DOWNLOAD_TIMEOUT)"
                )
            # Asking for one byte more than the pin is how a larger file shows itself.
            block = response.read(min(DOWNLOAD_BLOCK_BYTES, dataset.size + 1 - received))
            if not block:
                break
            received += len(block)
            if received > dataset.size:
                raise LmforgeError(
                    f"download of {dataset.name!r} from {dataset.url} is larger than the pinned "
                    f"{dataset.size:,} bytes"
                )
            out.write(block)
    if received < dataset.size:
        raise LmforgeError(
            f"download of {dataset.name!r} from {dataset.url} ended after {received:,} of the pinned "
            f"{dataset.size:,} bytes"
        )


def _remove_stale_partials(target: Path, timeout: float) -> None:
    """Delete temporary files of earlier downloads of `target` that were killed midway.

    A file untouched for longer than the download deadline cannot belong to a live download (that
    would have been abandoned by now), so one being written by another process is left alone.
    """
    for partial in target.parent.glob(f".{target.name}.*"):
        try:
            if time.time() - partial.stat().st_mtime > timeout:
                partial.unlink()
        except FileNotFoundError:  # removed by another process meanwhile
            pass


@dataclass(frozen=True)
class Document:
    """One document: its text as an iterator of non-empty chunks, and where it comes from."""

    chunks: Iterator[str]
    path: Path
    line: int | None = None  # for a document of a .jsonl file: its line
    split: str | None = None  # "train"/"val" when the corpus comes split
    label: str | None = None  # a record's place ("file:line", "file: row N"), for messages

    def __iter__(self) -> Iterator[str]:
        return self.chunks

    def where(self, offset: int) -> tuple[str, str]:
        """(file, position) of character `offset` of the document, for messages."""
        if self.label is not None:
            return self.label, f"at character {offset:,} of its text"
        if self.line is None:
            return str(self.path), f"at character {offset:,}"
        return f"{self.path}:{self.line}", f"at character {offset:,} of its text"


@dataclass(frozen=True)
class Corpus:
    """The files of one input, in a fixed order, and a name for `meta.json`."""

    source: str
    files: tuple[Path, ...]
    invalid_utf8: str = "error"  # "error" or "replace"
    file_splits: tuple[str | None, ...] = ()  # per file, for a corpus that comes split: "train" or "val"
    document_end: str | None = None  # a line that ends each document inside a file (named datasets)
    format: str = "auto"  # how each file is read (INPUT_FORMATS); auto: by its suffix
    text_column: str = DEFAULT_TEXT_COLUMN  # the column of record files that holds the text
    hf: HFSource | None = None  # a Hugging Face dataset, streamed (no files)

    @property
    def given_split(self) -> bool:
        """Whether every file says which split it belongs to (then prepare keeps that split)."""
        return bool(self.file_splits) and None not in self.file_splits

    @property
    def total_bytes(self) -> int | None:
        """Size of all files on disk, for progress bars; None when gzipped (the text is larger) or streamed
        (hf:NAME)."""
        if not self.files or any(gzipped_suffix(f) is not None for f in self.files):
            return None
        return sum(f.stat().st_size for f in self.files)

    def sha256(self) -> str | None:
        """sha256 of a single file; for several, of the list of (relative path, file sha256); None for a
        Hugging Face dataset (its files are the library's)."""
        if not self.files:
            return None
        if len(self.files) == 1:
            return file_sha256(self.files[0])
        root = Path(os.path.commonpath([f.parent for f in self.files]))
        listing = "".join(f"{f.relative_to(root).as_posix()}\t{file_sha256(f)}\n" for f in self.files)
        return hashlib.sha256(listing.encode()).hexdigest()

    def documents(self) -> Iterator[Document]:
        """Yield each document, an iterable of non-empty text chunks."""
        if self.hf is not None:
            yield from _record_documents(self.hf.rows(), self.text_column, where=self.source)
            return
        splits = self.file_splits or (None,) * len(self.files)
        for path, split in zip(self.files, splits):
            kind = self.format if self.format != "auto" else input_kind(path)
            if kind == "jsonl" and self.text_column == DEFAULT_TEXT_COLUMN:
                yield from _jsonl_documents(path, self.invalid_utf8)
            elif kind != "text":
                rows = read_rows(path, invalid_utf8=self.invalid_utf8, kind=kind)
                yield from _record_documents(rows, self.text_column, where=path)
            elif self.document_end is not None:
                yield from _separated_documents(path, self.invalid_utf8, self.document_end, split=split)
            else:
                yield Document(_text_chunks(path, self.invalid_utf8), path, split=split)


def open_corpus(
    spec: str, invalid_utf8: str = "error", *, input_format: str = "auto", text_column: str | None = None
) -> Corpus:
    """Turn the INPUT argument (file, folder, dataset name or hf:NAME) into a Corpus; `input_format`
    (prepare's --format) says how to read its files, `text_column` which column of records is the text."""
    column = text_column or DEFAULT_TEXT_COLUMN
    path = Path(spec).expanduser()
    if spec.startswith(HF_PREFIX):
        return Corpus(spec, (), invalid_utf8, text_column=column, hf=HFSource.parse(spec))
    if path.is_file():
        if input_format == "auto":
            input_kind(path, refuse=True)
        files: tuple[Path, ...] = (_absolute(path),)
        source = str(files[0])
    elif path.is_dir():
        files = tuple(
            sorted(_absolute(p) for p in path.rglob("*") if p.is_file() and _of_format(p, input_format))
        )
        if not files:
            raise LmforgeError(
                f"{path}: no {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files in this folder"
            )
        source = str(_absolute(path))
    elif spec in NAMED_DATASETS:
        parts = NAMED_DATASETS[spec]
        files = tuple(resolve_named_dataset(part) for part in parts)
        return Corpus(spec, files, invalid_utf8, tuple(p.split for p in parts), parts[0].document_end)
    elif os.sep in spec or "." in spec:
        raise LmforgeError(f"{spec}: no such file or folder")
    else:
        known = ", ".join(sorted(NAMED_DATASETS))
        raise LmforgeError(
            f"{spec!r} is neither a file, a folder nor a known dataset ({known}); "
            "a Hugging Face dataset is hf:NAME"
        )
    if sum(f.stat().st_size for f in files) == 0:
        raise LmforgeError(f"{spec}: input is empty")
    return Corpus(
        source=source, files=files, invalid_utf8=invalid_utf8, format=input_format, text_column=column
    )


def _absolute(path: Path) -> Path:
    """`path` made absolute without following links: a linked file (a Hugging Face cache snapshot's
    `train.txt`, a link to a blob named by its hash) is read by its own name's suffix."""
    return Path(os.path.abspath(path))


def _of_format(path: Path, input_format: str) -> bool:
    """Whether a folder's file is read under --format: auto reads text and record files, text reads text
    files (gzipped too), a record type its own."""
    if input_format in ("auto", "text") and _is_text(path):
        return True
    kind = file_type(path)
    return kind is not None and input_format in ("auto", kind)


def _is_text(path: Path) -> bool:
    """Whether `path` is a plain text file by its suffix, also gzipped (`.txt.gz`)."""
    return file_suffix(path) in TEXT_SUFFIXES or gzipped_suffix(path) in TEXT_SUFFIXES


def input_kind(path: Path, *, refuse: bool = False) -> str:
    """How a file is read by its suffix: "text" (also gzipped text, e.g. .txt.gz) or a record file type.
    A file of another type (a .gz of records included) is an error naming --format."""
    if (kind := file_type(path)) is not None:
        return kind
    if _is_text(path):
        return "text"
    if (inner := gzipped_suffix(path)) in FILE_TYPES:
        raise LmforgeError(
            f"{path}: compressed {inner} records are not read; decompress the file (or give "
            "--format text to read it as plain text)"
        )
    kinds = "|".join(INPUT_FORMATS[1:])
    raise LmforgeError(
        f"{path}: unknown file type {path.suffix or '(none)'!r}; give --format {kinds} to say how to read "
        "it (records take --text-column)"
    )


@dataclass(frozen=True)
class HFSource:
    """INPUT hf:NAME[:CONFIG][@SPLIT]: a Hugging Face dataset (hub id or local folder), streamed."""

    name: str
    split: str = "train"
    config: str = ""

    @classmethod
    def parse(cls, spec: str) -> HFSource:
        rest, _, split = spec[len(HF_PREFIX) :].partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise LmforgeError(f"{spec}: expected hf:ORG/NAME, hf:ORG/NAME:CONFIG or hf:ORG/NAME@SPLIT")
        return cls(name, split or "train", config)

    def rows(self) -> Iterator[Row]:
        """The split's records, one at a time (streamed: memory stays bounded)."""
        return hf_rows(self.name, split=self.split, config=self.config, streaming=True)


def _record_documents(rows: Iterator[Row], column: str, *, where: object) -> Iterator[Document]:
    """One document per record: its `column` text (an empty text is no document)."""
    for row in rows:
        try:
            record = row.load()
        except ValueError as exc:
            raise LmforgeError(f"{row.where}: {exc}") from None
        text = record.get(column) if isinstance(record, dict) else None
        if isinstance(record, dict) and column in record and not isinstance(text, str):
            held = "null" if text is None else type(text).__name__  # e.g. a Parquet column's missing value
            raise LmforgeError(f"{row.where}: column {column!r} holds {held}, not a string")
        if not isinstance(text, str):
            found = ", ".join(repr(k) for k in list(record)[:8]) if isinstance(record, dict) else "no columns"
            raise LmforgeError(
                f"{row.where}: no text column {column!r} (name it with --text-column; found {found})"
            )
        if text:
            yield Document(iter((text,)), Path(str(where)), split=None, label=row.where)


def _text_chunks(path: Path, invalid_utf8: str) -> Iterator[str]:
    """Decode a file in chunks, each cut after its last newline when it has one. A UTF-8 byte order
    mark at its start is no character of the text (Windows editors write one)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    carry = ""
    with _open_binary(path) as f:
        if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:
            consumed = len(codecs.BOM_UTF8)
        else:
            f.seek(0)
        while True:
            raw = f.read(CHUNK_BYTES)
            final = not raw
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                pending = len(decoder.getstate()[0])
                offset = consumed - pending + exc.start
                if invalid_utf8 != "replace":
                    raise LmforgeError(
                        f"{path}: invalid UTF-8 at byte {offset} "
                        "(use --invalid-utf8 replace to substitute U+FFFD)"
                    ) from None
                logger.warning(f"{path}: invalid UTF-8 from byte {offset} replaced with U+FFFD")
                buffered = decoder.getstate()[0]
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                text = decoder.decode(buffered + raw, final=final)
            consumed += len(raw)
            text = carry + text
            if final:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < 4 * CHUNK_BYTES:
                carry = text
                continue
            cut = cut or len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes; a `.gz` file's decompressed as it is read (never whole on disk or in memory)."""
    return gzip.open(path, "rb") if gzipped_suffix(path) is not None else open(path, "rb")


def _separated_documents(
    path: Path, invalid_utf8: str, end_line: str, *, split: str | None
) -> Iterator[Document]:
    """The documents of a file in which the line `end_line` follows each document.

    A document's text stops before the newline that precedes its end line. Each document must be
    read to its end before the next one is asked for (prepare's passes do that); text after the last
    end line is a last document, and empty documents are skipped.
    """
    pieces = _text_and_ends(_text_chunks(path, invalid_utf8), end_line)

    def rest() -> Iterator[str]:
        for piece in pieces:
            if piece is None:
                return
            yield piece

    for first in pieces:
        if first is None:  # an empty document
            continue
        document = itertools.chain((first,), rest())
        yield Document(document, path, split=split)
        for _ in document:  # a document the caller did not read to its end
            pass


def _text_and_ends(chunks: Iterator[str], end_line: str) -> Iterator[str | None]:
    """The text of line-aligned chunks, None in place of each `end_line` line and the newline before it."""
    pattern = re.compile(rf"^{re.escape(end_line)}(?:\n|\Z)", re.MULTILINE)
    held = ""  # a text's final newline, which belongs to the end line when one follows
    at_line_start = True
    for chunk in chunks:
        start = 0
        for match in pattern.finditer(chunk):
            if match.start() == 0 and not at_line_start:
                continue
            text = held + chunk[start : match.start()]
            if text.endswith("\n"):
                text = text[:-1]
            if text:
                yield text
            yield None
            held, start = "", match.end()
        text = held + chunk[start:]
        held = "\n" if text.endswith("\n") else ""
        if text[: len(text) - len(held)]:
            yield text[: len(text) - len(held)]
        at_line_start = chunk.endswith("\n")
    if held:
        yield held


def _jsonl_documents(path: Path, invalid_utf8: str) -> Iterator[Document]:
    """One document per line's `text` field; lines are read one at a time, each at most MAX_LINE_BYTES."""
    errors = "replace" if invalid_utf8 == "replace" else "strict"
    for line_no, raw in read_lines(path):
        if not raw.strip():
            continue
        try:
            record = loads(decode_line(raw, errors))
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        except ValueError:  # invalid UTF-8
            raise LmforgeError(
                f"{path}:{line_no}: invalid UTF-8 (use --invalid-utf8 replace to substitute U+FFFD)"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmforgeError(f"{path}:{line_no}: expected an object with a string 'text' field")
        if record["text"]:
            yield Document(iter((record["text"],)), path, line_no)
