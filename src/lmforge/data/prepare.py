"""`lmforge prepare`: stream a corpus through a tokenizer into `train.bin` / `val.bin`.

Two streaming passes keep memory bounded whatever the corpus size: the first counts
documents and characters (and trains the BPE or collects the char alphabet), the second
encodes chunks in parallel batches (`encode_batch_fast` uses every core, in a worker thread while
the next batch is read) and appends the ids to the shards. Everything is written into a temporary
sibling folder that replaces `--out` only when it is complete, so a failed run never damages
existing work.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer

from lmforge import __version__
from lmforge.data import tokenizer as tok
from lmforge.data.canaries import CanaryInserter, CanarySpec, canary_alphabet, save_canaries
from lmforge.data.membership import MIN_LINE_CHARS, LineHoldout, check_holdout_lines, eligible_lines
from lmforge.data.pii import Scrubber, count_summary
from lmforge.data.sources import INPUT_FORMATS, Corpus, Document, open_corpus
from lmforge.errors import LmforgeError
from lmforge.progress import ProgressBar, progress_bar
from lmforge.staging import check_out, staged_folder

logger = logging.getLogger(__name__)

DEFAULT_BPE_VOCAB = 8192
BATCH_CHARS = 4 << 20  # text handed to one encode_batch call
META_FORMAT = 1


@dataclass
class _Scan:
    """What the first pass learns about the corpus."""

    documents: int = 0
    chars: int = 0
    text_bytes: int = 0
    alphabet: set[str] = field(default_factory=set)
    document_chars: array = field(default_factory=lambda: array("q"))  # of each non-empty document
    document_in_val: array = field(default_factory=lambda: array("b"))  # of each, when the corpus comes split
    eligible_lines: int = 0  # lines long enough to be held out (counted only for --holdout-lines)


@dataclass(frozen=True)
class PrepareReport:
    """What `prepare` wrote (the contents of meta.json) and how long each pass took."""

    meta: dict
    text_bytes: int
    scan_seconds: float
    encode_seconds: float
    summary: str = ""  # the line `lmforge prepare` prints at the end

    @property
    def encode_mb_per_s(self) -> float:
        """Throughput of the second pass, in MB of text per second."""
        return self.text_bytes / 1e6 / max(self.encode_seconds, 1e-9)


@dataclass
class _Split:
    """One output shard being written."""

    file: BinaryIO
    tokens: int = 0
    text_bytes: int = 0


@dataclass(frozen=True)
class _Layout:
    """How the second pass writes the shards, decided from the first pass."""

    vocab_size: int
    dtype: np.dtype  # uint16 when every id fits
    is_val: np.ndarray | None  # per document: held out whole; None: the text is split at split_char
    split_char: int | None  # the corpus character where val begins, when is_val is None
    eot: int | None  # appended after every document; None with a single document

    def train_chars(self, scan: _Scan) -> int:
        """Characters of the corpus that go to the train split."""
        if self.is_val is None:
            return self.split_char
        return int(np.asarray(scan.document_chars)[~self.is_val].sum())


@dataclass
class _Privacy:
    """What `--scrub-pii`, `--canaries` and `--holdout-lines` change in the text on its way to the
    tokenizer."""

    pii_kinds: tuple[str, ...] = ()
    canaries: CanarySpec | None = None
    holdout_lines: int | None = None
    scrubber: Scrubber | None = None  # the second pass's, whose counts go to meta.json
    inserter: CanaryInserter | None = None
    holdout: LineHoldout | None = None

    def plan(self, scan: _Scan, layout: _Layout, seed: int) -> None:
        """Where the canaries go and which lines are held out, once the split is known."""
        canaries = self.canaries.draw() if self.canaries is not None else []
        if self.canaries is not None:
            self.inserter = CanaryInserter(canaries, layout.train_chars(scan), self.canaries.seed)
        if self.holdout_lines is not None:
            train_lines = scan.eligible_lines * layout.train_chars(scan) / max(scan.chars, 1)
            if train_lines < 1:
                raise LmforgeError(
                    f"--holdout-lines: the train split has no line of {MIN_LINE_CHARS} or more characters"
                )
            never = frozenset(c.text for c in canaries)  # a canary's count must stay what was recorded
            self.holdout = LineHoldout.for_count(self.holdout_lines, train_lines, seed=seed, never=never)

    def train_text(self, text: str) -> str:
        """A piece of the train split with the canaries inserted and the held-out lines taken out."""
        if self.inserter is not None:
            text = self.inserter.insert(text)
        return self.holdout.take(text) if self.holdout is not None else text

    def scrubber_for_pass(self) -> Scrubber | None:
        """A fresh scrubber (both passes must see the same text); the last one made is kept."""
        self.scrubber = Scrubber(self.pii_kinds) if self.pii_kinds else None
        return self.scrubber

    def documents(self, corpus: Corpus) -> Iterator[Document]:
        """The corpus's documents, scrubbed of personal data when asked, by this pass's scrubber."""
        scrubber = self.scrubber_for_pass()
        for document in corpus.documents():
            if scrubber is None:
                yield document
            else:
                yield Document(scrubber.stream(document), document.path, document.line, document.split)

    def write(self, staging: Path, meta: dict) -> None:
        """Record the scrub counts, canaries and held-out lines in meta.json (and canaries.json,
        membership.json)."""
        if self.scrubber is not None:
            meta["pii"] = {"kinds": list(self.pii_kinds), "replaced": dict(self.scrubber.counts)}
        if self.inserter is not None:
            assert self.inserter.done == len(self.inserter.places), "a canary was not inserted"
            meta["canaries"] = save_canaries(staging, self.inserter.canaries, self.canaries)
        if self.holdout is not None:
            if not all(self.holdout.picked.values()):
                raise LmforgeError(
                    f"--holdout-lines {self.holdout_lines} picked no line for one side: the train split has "
                    f"too few lines of {MIN_LINE_CHARS} or more characters"
                )
            meta["membership"] = self.holdout.save(staging)

    def summary(self) -> str:
        parts = []
        if self.scrubber is not None:
            parts.append(f"replaced PII: {count_summary(self.scrubber.counts)}")
        if self.inserter is not None:
            parts.append(f"inserted {len(self.inserter.places):,} canary lines (canaries.json)")
        if self.holdout is not None:
            members, held_out = (len(lines) for lines in self.holdout.picked.values())
            parts.append(f"held out {held_out:,} lines beside {members:,} members (membership.json)")
        return "".join(f"; {part}" for part in parts)


def _user_tokenizer(
    tokenizer: str, unknown_chars: str, canaries: CanarySpec | None
) -> tuple[Tokenizer | None, tok.TextCoverage | None]:
    """A user's tokenizer.json and the check of what it can represent; (None, None) for a built-in."""
    if tokenizer in tok.BUILTIN_KINDS:
        return None, None
    user_tokenizer = tok.load_tokenizer(tokenizer)
    coverage = tok.TextCoverage(user_tokenizer, unknown_chars, tokenizer)
    if canaries is not None and coverage.unknown("".join(sorted(canary_alphabet()))):
        raise LmforgeError(f"{tokenizer}: the tokenizer cannot represent the canaries' digits and text")
    return user_tokenizer, coverage


def prepare(
    input: str,
    out: Path | str,
    tokenizer: str,
    *,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    invalid_utf8: str = "error",
    progress: bool = True,
    unknown_chars: str = "error",
    scrub_pii: tuple[str, ...] = (),
    canaries: CanarySpec | None = None,
    holdout_lines: int | None = None,
    input_format: str = "auto",
    text_column: str | None = None,
) -> PrepareReport:
    """Tokenize INPUT into OUT/{train,val}.bin, OUT/tokenizer.json and OUT/meta.json.

    INPUT: a file, a folder, a named dataset or hf:NAME (streamed); `input_format` says how its files
    are read (`sources.INPUT_FORMATS`), `text_column` which column of records is the text.

    `unknown_chars` says what becomes of text a user's tokenizer.json cannot represent: "error"
    (the default), "replace" (with its unknown token) or "skip". Built-in tokenizers represent all text.
    `scrub_pii` names the kinds of personal data (`lmforge.data.pii.KINDS`) replaced by placeholders
    in both passes; `canaries` are inserted into the train split and saved to OUT/canaries.json;
    about `holdout_lines` lines of the train text are taken out and as many marked as members, for
    membership inference (OUT/membership.json).
    """
    out = Path(out)
    _check_arguments(
        tokenizer,
        vocab_size,
        val_fraction,
        invalid_utf8=invalid_utf8,
        unknown_chars=unknown_chars,
        input_format=input_format,
    )
    # Checked before the slow passes, then again with every file of the corpus (a named dataset's too).
    tokenizer_file = [] if tokenizer in tok.BUILTIN_KINDS else [Path(tokenizer)]
    check_out(out, "data", overwrite, inputs=[p for p in (Path(input), *tokenizer_file) if p.exists()])
    user_tokenizer, coverage = _user_tokenizer(tokenizer, unknown_chars, canaries)
    corpus = open_corpus(input, invalid_utf8, input_format=input_format, text_column=text_column)
    privacy = _Privacy(scrub_pii, canaries, check_holdout_lines(holdout_lines))
    return _prepare_corpus(
        input,
        corpus,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        user_tokenizer=user_tokenizer,
        coverage=coverage,
        privacy=privacy,
        val_fraction=val_fraction,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        inputs=[*corpus.files, *tokenizer_file],
    )


def _prepare_corpus(
    input: str,
    corpus: Corpus,
    out: Path,
    *,
    tokenizer: str,
    vocab_size: int | None,
    user_tokenizer: Tokenizer | None,
    coverage: tok.TextCoverage | None,
    privacy: _Privacy,
    val_fraction: float,
    seed: int,
    overwrite: bool,
    progress: bool,
    inputs: list[Path],
) -> PrepareReport:
    """The two passes over an opened corpus, into a staging folder that becomes `out`."""
    start = time.perf_counter()
    scan, tokenizer_obj = _first_pass(
        corpus,
        input,
        tokenizer,
        vocab_size=vocab_size,
        user_tokenizer=user_tokenizer,
        progress=progress,
        privacy=privacy,
    )
    scan_seconds = time.perf_counter() - start
    layout = _plan_layout(scan, tokenizer_obj, val_fraction, seed=seed, given_split=corpus.given_split)
    privacy.plan(scan, layout, seed)
    with staged_folder(out, "data", overwrite, inputs=inputs) as staging:
        meta = _write_prepared(
            staging,
            input,
            corpus,
            scan=scan,
            tokenizer=tokenizer,
            tokenizer_obj=tokenizer_obj,
            layout=layout,
            coverage=coverage,
            privacy=privacy,
            progress=progress,
            val_fraction=val_fraction,
            seed=seed,
        )
    report = PrepareReport(meta, scan.text_bytes, scan_seconds, time.perf_counter() - start - scan_seconds)
    return replace(report, summary=_summary(report, corpus, tokenizer, out=out, privacy=privacy))


def _write_prepared(
    staging: Path,
    input: str,
    corpus: Corpus,
    *,
    scan: _Scan,
    tokenizer: str,
    tokenizer_obj: Tokenizer,
    layout: _Layout,
    coverage: tok.TextCoverage | None,
    privacy: _Privacy,
    progress: bool,
    val_fraction: float,
    seed: int,
) -> dict:
    """The second pass into the staging folder: the two shards, tokenizer.json, the privacy files and
    meta.json; returns the meta. Text the tokenizer could not represent is reported as a warning."""
    with open(staging / "train.bin", "wb") as train_file, open(staging / "val.bin", "wb") as val_file:
        splits = {"train": _Split(train_file), "val": _Split(val_file)}
        _encode(
            corpus,
            tokenizer_obj,
            layout,
            splits=splits,
            total_bytes=scan.text_bytes,
            progress=progress,
            coverage=coverage,
            privacy=privacy,
        )
    if splits["train"].tokens == 0 or splits["val"].tokens == 0:
        raise LmforgeError(
            f"{input}: too small to give a non-empty train and val split "
            f"({splits['train'].tokens} train, {splits['val'].tokens} val tokens "
            f"with --val-fraction {val_fraction})"
        )
    tokenizer_obj.save(str(staging / "tokenizer.json"))
    meta = _meta(
        corpus,
        scan,
        tokenizer,
        tokenizer_obj=tokenizer_obj,
        layout=layout,
        splits=splits,
        val_fraction=val_fraction,
        seed=seed,
    )
    privacy.write(staging, meta)
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if coverage is not None and coverage.report():
        logger.warning(coverage.report())  # what the tokenizer could not represent, said once
    return meta


def _summary(report: PrepareReport, corpus: Corpus, tokenizer: str, *, out: Path, privacy: _Privacy) -> str:
    meta = report.meta
    return (
        f"prepared {corpus.source}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']:,} ({meta['tokenizer']}); {report.text_bytes / 1e6:.1f} MB of text, "
        f"scan{'+train' if tokenizer == 'bpe' else ''} {report.scan_seconds:.1f} s, "
        f"encode {report.encode_seconds:.1f} s ({report.encode_mb_per_s:.2f} MB/s)"
        f"{privacy.summary()} -> {out}"
    )


def _first_pass(
    corpus: Corpus,
    input: str,
    tokenizer: str,
    *,
    vocab_size: int | None,
    user_tokenizer: Tokenizer | None,
    progress: bool,
    privacy: _Privacy,
) -> tuple[_Scan, Tokenizer]:
    """Scan the corpus once, training the BPE on the way; return what was learned and the tokenizer."""
    scan = _Scan()
    if privacy.canaries is not None:
        scan.alphabet.update(canary_alphabet())  # a char vocabulary holds every secret of the format
    chunks = _scan(corpus, scan, tokenizer == "char", progress=progress, privacy=privacy)
    if tokenizer == "bpe":
        tokenizer_obj = tok.train_bpe(chunks, vocab_size or DEFAULT_BPE_VOCAB)
    else:
        for _ in chunks:
            pass
    if scan.documents == 0:
        raise LmforgeError(f"{input}: input is empty (no text in any document)")
    if tokenizer == "char":
        tokenizer_obj = tok.char_tokenizer(scan.alphabet, specials=[tok.EOT] if scan.documents > 1 else [])
    elif tokenizer == "byte":
        tokenizer_obj = tok.byte_tokenizer()
    elif user_tokenizer is not None:
        tokenizer_obj = user_tokenizer
    logger.debug(
        f"scanned {input}: {scan.documents:,} document(s), {scan.chars:,} characters, "
        f"{scan.text_bytes:,} bytes; vocabulary {tok.vocab_size(tokenizer_obj):,}"
    )
    return scan, tokenizer_obj


def _plan_layout(
    scan: _Scan, tokenizer: Tokenizer, val_fraction: float, *, seed: int, given_split: bool = False
) -> _Layout:
    """The shards' dtype and the train/val split (the corpus's own, when it comes split), from the
    first pass and the tokenizer."""
    n_vocab = tok.vocab_size(tokenizer)
    if given_split:
        is_val = np.asarray(scan.document_in_val, dtype=bool)
    else:
        is_val = _choose_val_documents(scan.documents, val_fraction, seed)
    return _Layout(
        vocab_size=n_vocab,
        dtype=np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32),
        is_val=is_val,
        split_char=int(scan.chars * (1.0 - val_fraction)) if is_val is None else None,
        eot=tok.eot_id(tokenizer) if scan.documents > 1 else None,  # separators only between documents
    )


def _meta(
    corpus: Corpus,
    scan: _Scan,
    tokenizer: str,
    *,
    tokenizer_obj: Tokenizer,
    layout: _Layout,
    splits: dict[str, _Split],
    val_fraction: float,
    seed: int,
) -> dict:
    """The contents of meta.json: what `PreparedData.open` needs and how the data was made."""
    return {
        "format": META_FORMAT,
        "vocab_size": layout.vocab_size,
        "dtype": layout.dtype.name,
        "train_tokens": splits["train"].tokens,
        "val_tokens": splits["val"].tokens,
        "train_bytes": splits["train"].text_bytes,
        "val_bytes": splits["val"].text_bytes,
        "tokenizer": tokenizer if tokenizer in tok.BUILTIN_KINDS else "file",
        "tokenizer_file": None if tokenizer in tok.BUILTIN_KINDS else str(Path(tokenizer).resolve()),
        "eot_id": tok.eot_id(tokenizer_obj),
        "documents": scan.documents,
        "split": "given" if corpus.given_split else "tail" if layout.is_val is None else "documents",
        "val_documents": None if layout.is_val is None else int(layout.is_val.sum()),
        "val_fraction": None if corpus.given_split else val_fraction,
        "seed": seed,
        "source": corpus.source,
        "source_sha256": corpus.sha256(),
        "lmforge_version": __version__,
    }


def _check_arguments(
    tokenizer: str,
    vocab_size: int | None,
    val_fraction: float,
    *,
    invalid_utf8: str,
    unknown_chars: str,
    input_format: str = "auto",
) -> None:
    if vocab_size is not None and tokenizer != "bpe":
        raise LmforgeError("--vocab-size applies only to --tokenizer bpe")
    if not 0.0 < val_fraction < 1.0:
        raise LmforgeError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if input_format not in INPUT_FORMATS:
        raise LmforgeError(f"--format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if invalid_utf8 not in ("error", "replace"):
        raise LmforgeError(f"--invalid-utf8 must be 'error' or 'replace', got {invalid_utf8!r}")
    if unknown_chars not in tok.UNKNOWN_CHARS:
        raise LmforgeError(
            f"--unknown-chars must be one of {', '.join(tok.UNKNOWN_CHARS)}, got {unknown_chars!r}"
        )
    if tokenizer == "bpe" and vocab_size is not None:
        tok.check_bpe_vocab_size(vocab_size)


def _scan(
    corpus: Corpus, scan: _Scan, collect_alphabet: bool, *, progress: bool, privacy: _Privacy
) -> Iterator[str]:
    """First pass: yield every chunk (for BPE training) while filling in `scan`."""
    with progress_bar(
        total=corpus.total_bytes, unit="B", unit_scale=True, desc="scan", enabled=progress
    ) as bar:
        for document in privacy.documents(corpus):
            chars = 0
            for chunk in document:
                chars += len(chunk)
                size = len(chunk.encode("utf-8"))
                scan.text_bytes += size
                if collect_alphabet:
                    scan.alphabet.update(chunk)
                if privacy.holdout_lines is not None:
                    scan.eligible_lines += eligible_lines(chunk)
                bar.update(size)
                yield chunk
            if chars:
                scan.documents += 1
                scan.chars += chars
                scan.document_chars.append(chars)
                scan.document_in_val.append(document.split == "val")


def _choose_val_documents(documents: int, val_fraction: float, seed: int) -> np.ndarray | None:
    """A seeded choice of whole validation documents.

    None when there are too few documents to hold out even one at this fraction: then the
    validation split is the last `val_fraction` of the text (for one file, nanoGPT's split).
    """
    n_val = min(round(documents * val_fraction), documents - 1)
    if n_val < 1:
        return None
    is_val = np.zeros(documents, dtype=bool)
    is_val[np.random.default_rng(seed).choice(documents, size=n_val, replace=False)] = True
    return is_val


def _encode(
    corpus: Corpus,
    tokenizer: Tokenizer,
    layout: _Layout,
    *,
    splits: dict[str, _Split],
    total_bytes: int,
    progress: bool,
    coverage: tok.TextCoverage | None = None,
    privacy: _Privacy | None = None,
) -> None:
    """Second pass: encode in batches and append ids to each split's shard, in corpus order.

    With whole-document splitting `layout.is_val` says where each document goes; otherwise
    the text before character `layout.split_char` of the corpus is train and the rest is val.
    `layout.eot`, if given, is appended after every document. With `coverage`, text that does not
    survive the tokenizer is an error or handled by its policy. `privacy` scrubs the text, inserts
    canaries into train pieces and takes the held-out lines out of them.
    """
    is_val, split_char = layout.is_val, layout.split_char
    privacy = privacy or _Privacy()
    changes_train = privacy.inserter is not None or privacy.holdout is not None
    with (
        progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="encode", enabled=progress) as bar,
        _ShardWriter(tokenizer, layout.dtype, layout.eot, splits=splits, bar=bar, coverage=coverage) as out,
    ):
        index = -1
        position = 0  # characters of the corpus before this chunk
        for document in privacy.documents(corpus):
            seen = 0
            for chunk in document:
                if seen == 0:
                    index += 1
                in_val = None if is_val is None else bool(is_val[index])
                pieces = _pieces(
                    chunk, position, in_val, split_char=split_char, document=document, offset=seen
                )
                if changes_train:
                    pieces = [
                        replace(p, text=privacy.train_text(p.text)) if p.split == "train" else p
                        for p in pieces
                    ]
                out.add(pieces, len(chunk))
                seen += len(chunk)
                position += len(chunk)
            if seen and layout.eot is not None:
                in_val = is_val[index] if is_val is not None else position > split_char
                out.end_document("val" if in_val else "train")
        out.flush()


@dataclass(frozen=True)
class _Piece:
    """Text bound for one split, and where it starts in its document (for messages)."""

    split: str
    text: str | None  # None stands for <|endoftext|>
    document: Document | None = None
    start: int = 0  # characters of the document before this piece

    def where(self, i: int) -> tuple[str, str]:
        """(file, position) of character i of the piece."""
        return self.document.where(self.start + i)


def _pieces(
    chunk: str, position: int, in_val: bool | None, *, split_char: int | None, document: Document, offset: int
) -> list[_Piece]:
    """The pieces of a chunk that starts at character `position` of the corpus and `offset` of its document.

    A chunk goes whole to its document's split (`in_val`), or, when the text is split at
    `split_char`, to the side it lies on, cut in two if it straddles the boundary.
    """
    if in_val is not None:
        return [_Piece("val" if in_val else "train", chunk, document, offset)]
    if position + len(chunk) <= split_char:
        return [_Piece("train", chunk, document, offset)]
    if position >= split_char:
        return [_Piece("val", chunk, document, offset)]
    cut = split_char - position
    return [
        _Piece("train", chunk[:cut], document, offset),
        _Piece("val", chunk[cut:], document, offset + cut),
    ]


class _ShardWriter:
    """Collects pieces of text and encodes them a batch at a time (`encode_batch_fast` uses every
    core), appending the ids to each split's shard in the order the pieces came.

    A batch is encoded in a worker thread while the next one is read (the tokenizer releases the
    GIL): reading, decoding gzip and this bookkeeping overlap with the encoding. At most two batches
    are in memory, the one encoding and the one filling.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        dtype: np.dtype,
        eot: int | None,
        *,
        splits: dict[str, _Split],
        bar: ProgressBar,
        coverage: tok.TextCoverage | None = None,
    ) -> None:
        self.tokenizer, self.dtype, self.eot, self.splits, self.bar = tokenizer, dtype, eot, splits, bar
        self.coverage = coverage
        self.batch: list[_Piece] = []
        self.batch_chars = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-encode")
        self.pending: Future[dict[str, np.ndarray]] | None = None

    def add(self, pieces: list[_Piece], chars: int) -> None:
        """Queue the pieces of one chunk of `chars` characters; encode once a batch is full."""
        self.batch.extend(pieces)
        self.batch_chars += chars
        if self.batch_chars >= BATCH_CHARS:
            self._submit()

    def end_document(self, split: str) -> None:
        self.batch.append(_Piece(split, None))

    def flush(self) -> None:
        """Encode what is queued and write every batch still pending."""
        self._submit()
        self._write_pending()

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)  # after an error too: no thread left behind

    def _submit(self) -> None:
        """Write the batch encoded meanwhile, then hand the queued one to the worker."""
        self._write_pending()
        if self.batch:
            self.pending = self.worker.submit(self._encode_batch, self.batch)
        self.batch = []
        self.batch_chars = 0

    def _write_pending(self) -> None:
        if self.pending is not None:
            ids, self.pending = self.pending.result(), None
            for name, values in ids.items():
                values.tofile(self.splits[name].file)
                self.splits[name].tokens += len(values)

    def _encode_batch(self, batch: list[_Piece]) -> dict[str, np.ndarray]:
        """The ids of one batch for each split, <|endoftext|> included, in the pieces' order."""
        texts = [piece for piece in batch if piece.text is not None]
        encoded = iter(self._encode(texts))
        ids: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        eot = np.asarray([] if self.eot is None else [self.eot], dtype=self.dtype)
        for piece in batch:
            if piece.text is None:
                ids[piece.split].append(eot)
            else:
                ids[piece.split].append(np.asarray(next(encoded), dtype=self.dtype))
                size = len(piece.text.encode("utf-8"))
                self.splits[piece.split].text_bytes += size
                self.bar.update(size)
        return {name: np.concatenate(arrays or [eot[:0]]) for name, arrays in ids.items()}

    def _encode(self, pieces: list[_Piece]) -> list[list[int]]:
        """The ids of each piece. With a coverage check, each piece's ids are decoded and compared
        with its text (in batch, in parallel, like the encoding); only a piece that differs is looked
        at character by character. A tokenizer that represents all text by construction (a byte-level
        BPE) needs no check."""
        texts = [piece.text for piece in pieces]
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        if self.coverage is not None and not self.coverage.all_text:
            decoded = self.tokenizer.decode_batch(ids, skip_special_tokens=False)
            for k, (piece, text) in enumerate(zip(pieces, decoded)):
                if text != piece.text:
                    ids[k] = self.coverage.encode(piece.text, piece.where)
        return ids
