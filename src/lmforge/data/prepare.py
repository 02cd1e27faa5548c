"""`lmforge prepare`: stream a corpus through a tokenizer into `train.bin` / `val.bin`.

Two streaming passes keep memory bounded whatever the corpus size: the first counts
documents and characters (and trains the BPE or collects the char alphabet), the second
encodes chunks in parallel batches (`encode_batch` uses every core) and appends the ids to
the shards. Everything is written into a temporary sibling folder that replaces `--out` only
when it is complete, so a failed run never damages existing work.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lmforge import __version__
from lmforge.data import tokenizer as tok
from lmforge.data.sources import Corpus, open_corpus
from lmforge.errors import LmforgeError
from lmforge.staging import check_out, staged_folder

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


@dataclass(frozen=True)
class PrepareReport:
    """What `prepare` wrote (the contents of meta.json) and how long each pass took."""

    meta: dict
    text_bytes: int
    scan_seconds: float
    encode_seconds: float

    @property
    def encode_mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.encode_seconds, 1e-9)


@dataclass
class _Split:
    """One output shard being written."""

    file: BinaryIO
    tokens: int = 0
    text_bytes: int = 0


def prepare(
    input: str,
    out: Path | str,
    tokenizer: str,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    invalid_utf8: str = "error",
    progress: bool = True,
) -> PrepareReport:
    """Tokenize INPUT into OUT/{train,val}.bin, OUT/tokenizer.json and OUT/meta.json."""
    out = Path(out)
    _check_arguments(tokenizer, vocab_size, val_fraction, invalid_utf8)
    check_out(out, overwrite)
    user_tokenizer = None if tokenizer in tok.BUILTIN_KINDS else tok.load_tokenizer(tokenizer)
    corpus = open_corpus(input, invalid_utf8)
    if any(out.resolve() in f.parents for f in corpus.files):
        raise LmforgeError(f"--out {out} contains the input files; choose another folder")

    start = time.perf_counter()
    scan = _Scan()
    chunks = _scan(corpus, scan, collect_alphabet=tokenizer == "char", progress=progress)
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

    scan_seconds = time.perf_counter() - start
    n_vocab = tok.vocab_size(tokenizer_obj)
    dtype = np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)
    is_val = _choose_val_documents(scan.documents, val_fraction, seed)
    split_char = int(scan.chars * (1.0 - val_fraction)) if is_val is None else None
    eot = tok.eot_id(tokenizer_obj) if scan.documents > 1 else None  # separators only between documents

    with staged_folder(out, overwrite) as staging:
        with open(staging / "train.bin", "wb") as train_file, open(staging / "val.bin", "wb") as val_file:
            splits = {"train": _Split(train_file), "val": _Split(val_file)}
            _encode(corpus, tokenizer_obj, dtype, splits, is_val, split_char, eot, scan.text_bytes, progress)
        if splits["train"].tokens == 0 or splits["val"].tokens == 0:
            raise LmforgeError(
                f"{input}: too small to give a non-empty train and val split "
                f"({splits['train'].tokens} train, {splits['val'].tokens} val tokens "
                f"with --val-fraction {val_fraction})"
            )
        tokenizer_obj.save(str(staging / "tokenizer.json"))
        meta = {
            "format": META_FORMAT,
            "vocab_size": n_vocab,
            "dtype": dtype.name,
            "train_tokens": splits["train"].tokens,
            "val_tokens": splits["val"].tokens,
            "train_bytes": splits["train"].text_bytes,
            "val_bytes": splits["val"].text_bytes,
            "tokenizer": tokenizer if tokenizer in tok.BUILTIN_KINDS else "file",
            "tokenizer_file": None if tokenizer in tok.BUILTIN_KINDS else str(Path(tokenizer).resolve()),
            "eot_id": tok.eot_id(tokenizer_obj),
            "documents": scan.documents,
            "split": "tail" if is_val is None else "documents",
            "val_documents": None if is_val is None else int(is_val.sum()),
            "val_fraction": val_fraction,
            "seed": seed,
            "source": corpus.source,
            "source_sha256": corpus.sha256(),
            "lmforge_version": __version__,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    report = PrepareReport(meta, scan.text_bytes, scan_seconds, time.perf_counter() - start - scan_seconds)
    print(
        f"prepared {corpus.source}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab {n_vocab:,} ({meta['tokenizer']}); {report.text_bytes / 1e6:.1f} MB of text, "
        f"scan{'+train' if tokenizer == 'bpe' else ''} {scan_seconds:.1f} s, "
        f"encode {report.encode_seconds:.1f} s ({report.encode_mb_per_s:.2f} MB/s) -> {out}",
        file=sys.stderr,
    )
    return report


def _check_arguments(tokenizer: str, vocab_size: int | None, val_fraction: float, invalid_utf8: str) -> None:
    if vocab_size is not None and tokenizer != "bpe":
        raise LmforgeError("--vocab-size applies only to --tokenizer bpe")
    if not 0.0 < val_fraction < 1.0:
        raise LmforgeError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if invalid_utf8 not in ("error", "replace"):
        raise LmforgeError(f"--invalid-utf8 must be 'error' or 'replace', got {invalid_utf8!r}")
    if tokenizer == "bpe" and vocab_size is not None:
        tok.check_bpe_vocab_size(vocab_size)


def _scan(corpus: Corpus, scan: _Scan, collect_alphabet: bool, progress: bool) -> Iterator[str]:
    """First pass: yield every chunk (for BPE training) while filling in `scan`."""
    with tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc="scan", disable=not progress) as bar:
        for document in corpus.documents():
            chars = 0
            for chunk in document:
                chars += len(chunk)
                size = len(chunk.encode("utf-8"))
                scan.text_bytes += size
                if collect_alphabet:
                    scan.alphabet.update(chunk)
                bar.update(size)
                yield chunk
            if chars:
                scan.documents += 1
                scan.chars += chars


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
    dtype: np.dtype,
    splits: dict[str, _Split],
    is_val: np.ndarray | None,
    split_char: int | None,
    eot: int | None,
    total_bytes: int,
    progress: bool,
) -> None:
    """Second pass: encode in batches and append ids to each split's shard, in corpus order.

    With whole-document splitting `is_val` says where each document goes; otherwise the
    text before character `split_char` of the corpus is train and the rest is val. `eot`,
    if given, is appended after every document.
    """
    batch: list[tuple[str, str | None]] = []  # (split, text); text None stands for <|endoftext|>
    batch_chars = 0

    def flush() -> None:
        texts = [text for _, text in batch if text is not None]
        encodings = iter(tokenizer.encode_batch(texts, add_special_tokens=False))
        ids: dict[str, list[int]] = {"train": [], "val": []}
        for name, text in batch:
            if text is None:
                ids[name].append(eot)
            else:
                ids[name].extend(next(encodings).ids)
                size = len(text.encode("utf-8"))
                splits[name].text_bytes += size
                bar.update(size)
        for name, values in ids.items():
            np.asarray(values, dtype=dtype).tofile(splits[name].file)
            splits[name].tokens += len(values)
        batch.clear()

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
        index = -1
        position = 0  # characters of the corpus before this chunk
        for document in corpus.documents():
            seen = 0
            for chunk in document:
                if seen == 0:
                    index += 1
                if is_val is not None:
                    batch.append(("val" if is_val[index] else "train", chunk))
                elif position + len(chunk) <= split_char:
                    batch.append(("train", chunk))
                elif position >= split_char:
                    batch.append(("val", chunk))
                else:
                    cut = split_char - position
                    batch.extend([("train", chunk[:cut]), ("val", chunk[cut:])])
                seen += len(chunk)
                position += len(chunk)
                batch_chars += len(chunk)
                if batch_chars >= BATCH_CHARS:
                    flush()
                    batch_chars = 0
            if seen and eot is not None:
                in_val = is_val[index] if is_val is not None else position > split_char
                batch.append(("val" if in_val else "train", None))
        flush()
