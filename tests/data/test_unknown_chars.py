"""`prepare` with a tokenizer.json that cannot represent part of the corpus: an error naming the first
such character by file and offset, unless --unknown-chars replace or skip says what to do instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from lmforge.data import prepare
from lmforge.data.tokenizer import char_tokenizer, load_tokenizer

TEXT = "abcabcabc\n" * 30


def read_ids(out: Path) -> list[int]:
    meta = json.loads((out / "meta.json").read_text())
    return [int(i) for s in ("train", "val") for i in np.fromfile(out / f"{s}.bin", dtype=meta["dtype"])]


def with_unk(alphabet: str) -> Tokenizer:
    """A char tokenizer that maps characters outside `alphabet` to <unk>."""
    vocab = {c: i for i, c in enumerate(sorted(set(alphabet)))}
    vocab["<unk>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A text with one 'd' that a tokenizer built from "abc\\n" cannot represent, at character 125."""
    (tmp_path / "in.txt").write_text(TEXT[:125] + "d" + TEXT[125:])
    char_tokenizer("abc\n").save(str(tmp_path / "abc.json"))
    with_unk("abc\n").save(str(tmp_path / "abc-unk.json"))
    return tmp_path


def run(cli, corpus: Path, tokenizer: str, *options: str) -> tuple[int, str]:
    code, _, err = cli(
        "prepare",
        corpus / "in.txt",
        "--tokenizer",
        corpus / tokenizer,
        "--out",
        corpus / "out",
        "-q",
        *options,
    )
    return code, err


@pytest.mark.parametrize("tokenizer", ["abc.json", "abc-unk.json"])
def test_a_character_the_tokenizer_cannot_represent_is_an_error(cli, corpus: Path, tokenizer: str) -> None:
    code, err = run(cli, corpus, tokenizer)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{corpus / 'in.txt'}: character 'd' (U+0064) at character 125 cannot be represented" in err
    assert "--unknown-chars" in err and not (corpus / "out").exists()


def test_skip_drops_the_character_and_counts_it(cli, corpus: Path) -> None:
    code, err = run(cli, corpus, "abc.json", "--unknown-chars", "skip")
    assert code == 0, err
    assert "skipped 1 character the tokenizer cannot represent (first: 'd' (U+0064)" in err
    assert load_tokenizer(corpus / "out" / "tokenizer.json").decode(read_ids(corpus / "out")) == TEXT


def test_replace_uses_the_unknown_token(cli, corpus: Path) -> None:
    code, err = run(cli, corpus, "abc-unk.json", "--unknown-chars", "replace")
    assert code == 0, err
    assert "replaced 1 character the tokenizer cannot represent with '<unk>'" in err
    ids = read_ids(corpus / "out")
    unk = with_unk("abc\n").token_to_id("<unk>")
    assert ids.count(unk) == 1 and len(ids) == len(TEXT) + 1 and ids[125] == unk


def test_replace_needs_an_unknown_token(cli, corpus: Path) -> None:
    code, err = run(cli, corpus, "abc.json", "--unknown-chars", "replace")
    assert code == 1 and err.count("\n") == 1
    assert "abc.json has no unknown token; use --unknown-chars skip" in err


def test_a_jsonl_document_names_its_line(cli, tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    lines = [json.dumps({"text": t}) for t in ["abc\n" * 20, "ab\nca" * 10 + "ä", "cab\n" * 20]]
    (tmp_path / "docs" / "d.jsonl").write_text("\n".join(lines) + "\n")
    char_tokenizer("abc\n").save(str(tmp_path / "abc.json"))
    code, _, err = cli(
        "prepare", tmp_path / "docs", "--tokenizer", tmp_path / "abc.json", "--out", tmp_path / "o", "-q"
    )
    assert code == 1
    assert f"{tmp_path / 'docs' / 'd.jsonl'}:2: character 'ä' (U+00E4) at character 50 of its text" in err


def test_a_representable_corpus_gives_the_same_shards_as_before(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text(TEXT)
    char_tokenizer("abc\n").save(str(tmp_path / "abc.json"))
    meta = prepare(
        str(tmp_path / "in.txt"), tmp_path / "o", tokenizer=str(tmp_path / "abc.json"), progress=False
    )
    assert meta.meta["train_tokens"] + meta.meta["val_tokens"] == len(TEXT)
    assert load_tokenizer(tmp_path / "abc.json").decode(read_ids(tmp_path / "o")) == TEXT


def test_a_tokenizer_that_alters_text_without_unknown_characters_is_refused(tmp_path: Path, cli) -> None:
    """Without a decoder, decode() joins tokens with spaces: no character is unknown, but the text changes."""
    vocab = {c: i for i, c in enumerate("abc\n")}
    Tokenizer(models.BPE(vocab, [])).save(str(tmp_path / "nodecoder.json"))
    (tmp_path / "in.txt").write_text(TEXT)
    for option in ("error", "skip"):
        code, _, err = cli(
            "prepare", tmp_path / "in.txt", "--tokenizer", tmp_path / "nodecoder.json",
            "--out", tmp_path / "o", "-q", "--unknown-chars", option,
        )  # fmt: skip
        assert code == 1 and "does not reproduce the text at character 1" in err, err
