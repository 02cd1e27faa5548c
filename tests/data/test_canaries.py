"""`prepare --canaries N --canary-repeats ...`: secrets inserted into the train split a recorded
number of times, each on a line of its own, and saved apart in canaries.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import prepare
from lmforge.data.canaries import CanarySpec, canary_text, load_canaries
from lmforge.data.tokenizer import char_tokenizer, load_tokenizer

LINES = [f"line {chr(97 + i % 26)} of the corpus, number {i}\n" for i in range(400)]


def decoded(folder: Path, split: str) -> str:
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]).tolist()
    return load_tokenizer(folder / "tokenizer.json").decode(ids, skip_special_tokens=False)


def remove_canaries(text: str, texts: set[str]) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if line.rstrip("\n") not in texts)


def test_each_canary_is_in_train_as_often_as_recorded_and_nowhere_else(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(LINES))
    plain = prepare(str(tmp_path / "in.txt"), tmp_path / "plain", tokenizer="char", progress=False)
    meta = prepare(
        str(tmp_path / "in.txt"),
        tmp_path / "d",
        tokenizer="char",
        progress=False,
        canaries=CanarySpec(3, (0, 1, 4, 16), seed=7),
    ).meta
    canaries = load_canaries(tmp_path / "d" / "canaries.json").canaries
    assert [c.repeats for c in canaries] == [0] * 3 + [1] * 3 + [4] * 3 + [16] * 3
    assert len({c.secret for c in canaries}) == 12
    assert meta["canaries"] == {
        "file": "canaries.json",
        "per_repeat": 3,
        "repeats": [0, 1, 4, 16],
        "inserted": 63,
    }
    train, val = decoded(tmp_path / "d", "train"), decoded(tmp_path / "d", "val")
    lines = train.splitlines()
    for canary in canaries:
        assert lines.count(canary.text) == canary.repeats  # each on a line of its own
        assert canary.text not in val
    # The corpus itself is untouched: without the canary lines it is the plain split.
    texts = {c.text for c in canaries}
    assert remove_canaries(train, texts) == decoded(tmp_path / "plain", "train")
    assert val == decoded(tmp_path / "plain", "val")
    assert meta["train_tokens"] == plain.meta["train_tokens"] + 63 * len(canaries[0].text + "\n")
    assert set("0123456789") <= set(load_tokenizer(tmp_path / "d" / "tokenizer.json").get_vocab())


def test_with_documents_held_out_canaries_go_only_into_train_documents(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(20):
        (tmp_path / "in" / f"doc{i:02d}.txt").write_text("".join(LINES[i * 20 : i * 20 + 20]))
    prepare(
        str(tmp_path / "in"),
        tmp_path / "d",
        tokenizer="char",
        progress=False,
        canaries=CanarySpec(2, (8,), 0),
    )
    canaries = load_canaries(tmp_path / "d" / "canaries.json").canaries
    train = decoded(tmp_path / "d", "train")
    assert all(train.splitlines().count(c.text) == 8 for c in canaries)
    assert not any(c.text in decoded(tmp_path / "d", "val") for c in canaries)


def test_the_seed_fixes_the_secrets_and_their_places(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(LINES))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare(
            str(tmp_path / "in.txt"),
            tmp_path / name,
            tokenizer="char",
            progress=False,
            canaries=CanarySpec(2, (4,), seed),
        )
    read = {name: (tmp_path / name / "train.bin").read_bytes() for name in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]
    assert canary_text("481902") == "my PIN is 4 8 1 9 0 2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--canaries", "2", "--canary-repeats", "1,x"],
            "--canary-repeats expects distinct non-negative integers",
        ),
        (["--canaries", "2", "--canary-repeats", "4,4"], "--canary-repeats expects distinct"),
        (["--canaries", "2", "--canary-repeats=-1"], "--canary-repeats expects distinct"),
        (["--canary-repeats", "1,4"], "--canary-repeats needs --canaries N"),
        (["--canaries", "0"], "--canaries must be between 1 and 10,000, got 0"),
    ],
)
def test_bad_canary_options_are_one_line_errors(cli, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "in.txt").write_text("".join(LINES))
    code, _, err = cli("prepare", tmp_path / "in.txt", "--tokenizer", "char", "--out", tmp_path / "d", *args)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("lmforge prepare: error: ") and message in err
    assert not (tmp_path / "d").exists()


def test_a_tokenizer_without_digits_cannot_take_canaries(cli, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("abc abc\n" * 50)
    char_tokenizer("abc \n").save(str(tmp_path / "tok.json"))
    code, _, err = cli(
        "prepare",
        tmp_path / "in.txt",
        "--tokenizer",
        tmp_path / "tok.json",
        "--out",
        tmp_path / "d",
        "--canaries",
        "1",
    )
    assert code == 1 and "cannot represent the canaries' digits" in err
