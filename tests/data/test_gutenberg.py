"""The `gutenberg` named dataset: pinned gzipped files, streamed, split by book as given."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

from lmforge.data import sources
from lmforge.data.loader import PreparedData
from lmforge.data.tokenizer import EOT, load_tokenizer
from tests.conftest import GUTENBERG_BOOKS, write_gutenberg


def decoded(out: Path, split: str) -> str:
    data = PreparedData.open(out)
    return load_tokenizer(out / "tokenizer.json").decode(
        getattr(data, split).tolist(), skip_special_tokens=False
    )


def test_gutenberg_keeps_its_split_by_book(cli, tiny_gutenberg, tmp_path: Path) -> None:
    code, _, err = cli("prepare", "gutenberg", "--tokenizer", "char", "--out", tmp_path / "d", "-q")
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["split"], meta["documents"], meta["val_documents"]) == ("given", 5, 1)
    assert meta["val_fraction"] is None
    # Each book is its text (the separator line and the newline before it dropped), then <|endoftext|>.
    assert decoded(tmp_path / "d", "train") == "".join(book.strip() + EOT for book in tiny_gutenberg["train"])
    assert decoded(tmp_path / "d", "val") == tiny_gutenberg["val"][0].strip() + EOT


def test_gutenberg_with_bpe_reports_the_source(cli, tiny_gutenberg, tmp_path: Path) -> None:
    out = tmp_path / "d"
    code, _, err = cli(
        "prepare", "gutenberg", "--tokenizer", "bpe", "--vocab-size", "300", "--out", out, "-q"
    )
    assert code == 0, err
    assert "prepared gutenberg: " in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "gutenberg" and meta["vocab_size"] == 300 and meta["eot_id"] is not None
    assert decoded(out, "val") == GUTENBERG_BOOKS["val"][0].strip() + EOT


def test_a_corrupted_gutenberg_copy_is_refused_naming_file_and_hashes(
    cli, tmp_path: Path, monkeypatch
) -> None:
    books = {"train": ["not the pinned book"], "val": ["nor this one"]}
    paths = write_gutenberg(tmp_path / "shared", books)
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "shared"))
    code, _, err = cli("prepare", "gutenberg", "--tokenizer", "bpe", "--out", tmp_path / "d", "-q")
    pinned = sources.NAMED_DATASETS["gutenberg"][0].sha256
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert str(paths["train"]) in err and sources.file_sha256(paths["train"]) in err and pinned in err
    assert not (tmp_path / "d").exists()


def test_gutenberg_without_a_local_copy_says_it_cannot_be_downloaded(
    cli, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "empty"))
    code, _, err = cli("prepare", "gutenberg", "--tokenizer", "bpe", "--out", tmp_path / "d", "-q")
    assert code == 1 and "train.txt.gz is not in $LMFORGE_DATA_DIR/gutenberg" in err
    assert "no public download" in err


def test_the_shared_gutenberg_files_pass_their_pins_and_stream_in_chunks(shared_data: Path) -> None:
    root = shared_data
    corpus = sources.open_corpus("gutenberg")  # checks both pinned sha256
    assert corpus.given_split and [p.name for p in corpus.files] == ["train.txt.gz", "valid.txt.gz"]
    with open(root / "gutenberg" / "books.tsv", encoding="utf-8", newline="") as f:
        rows = [row for row in csv.DictReader(f, delimiter="\t") if row["split"] == "valid"]
    valid = replace(corpus, files=corpus.files[1:], file_splits=("val",))
    sizes, longest = [], 0
    for document in valid.documents():
        chunks = list(document)
        longest = max(longest, *(len(c) for c in chunks))
        sizes.append(sum(len(c.encode("utf-8")) for c in chunks))
    assert sizes == [int(row["bytes"]) for row in rows]  # the books of books.tsv, byte for byte
    assert longest <= 4 * sources.CHUNK_BYTES  # a book is read a chunk at a time, never whole
