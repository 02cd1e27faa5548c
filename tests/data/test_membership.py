"""`prepare --holdout-lines N`: about N random lines of the train text taken out of the data and about N
others marked as members, both saved in membership.json for the audit's membership inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmforge
from lmforge.data import prepare
from lmforge.data.canaries import CanarySpec, load_canaries
from lmforge.data.membership import MIN_LINE_CHARS, LineHoldout, load_membership
from lmforge.data.tokenizer import load_tokenizer

LINES = [f"line {chr(97 + i % 26)} of the corpus, number {i}" for i in range(600)]


def decoded(folder: Path, split: str) -> str:
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]).tolist()
    return load_tokenizer(folder / "tokenizer.json").decode(ids, skip_special_tokens=False)


def test_held_out_lines_leave_the_data_and_members_stay_in_train(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in LINES))
    plain = prepare(str(tmp_path / "in.txt"), tmp_path / "plain", tokenizer="char", progress=False)
    meta = prepare(
        str(tmp_path / "in.txt"), tmp_path / "d", tokenizer="char", progress=False, holdout_lines=100
    ).meta
    lines = load_membership(tmp_path / "d" / "membership.json")
    assert meta["membership"] == {
        "file": "membership.json",
        "members": len(lines.members),
        "held_out": len(lines.held_out),
    }
    assert 70 <= len(lines.members) <= 130 and 70 <= len(lines.held_out) <= 130  # binomial around 100
    plain_train = decoded(tmp_path / "plain", "train").splitlines()
    assert set(lines.members).isdisjoint(lines.held_out) and set(lines.held_out) <= set(plain_train)
    train = decoded(tmp_path / "d", "train").splitlines()
    assert set(lines.members) <= set(train) and set(lines.held_out).isdisjoint(train)
    # Nothing else changed: the train split is the plain one without the held-out lines, val the same.
    assert train == [line for line in plain_train if line not in set(lines.held_out)]
    assert decoded(tmp_path / "d", "val") == decoded(tmp_path / "plain", "val")
    assert meta["val_tokens"] == plain.meta["val_tokens"]


def test_every_copy_of_a_held_out_line_goes_and_short_lines_and_canaries_stay(tmp_path: Path) -> None:
    corpus = [line for pair in zip(LINES[:300], LINES[:300]) for line in (*pair, "ROMEO:", "")]
    (tmp_path / "in.txt").write_text("\n".join(corpus) + "\n")
    prepare(
        str(tmp_path / "in.txt"),
        tmp_path / "d",
        tokenizer="char",
        progress=False,
        holdout_lines=50,
        canaries=CanarySpec(3, (0, 8), seed=0),
    )
    lines = load_membership(tmp_path / "d" / "membership.json")
    train = decoded(tmp_path / "d", "train").splitlines()
    assert lines.held_out and set(lines.held_out).isdisjoint(train)  # both copies of each went
    assert all(train.count(line) == 2 for line in lines.members)
    assert all(len(line) >= MIN_LINE_CHARS for line in lines.members + lines.held_out)
    canaries = load_canaries(tmp_path / "d" / "canaries.json").canaries
    assert all(train.count(c.text) == c.repeats for c in canaries)  # 21 characters, but never picked


def test_a_line_is_picked_only_whole() -> None:
    holdout = LineHoldout(1.0, seed=0)  # every long enough line is picked
    # one line in three pieces: the first has no line break, the others each end or begin a line
    pieces = [
        "the start of a long line",
        " goes on here\nfirst whole line of the text\nsecond whole",
        " one, cut\n",
    ]
    kept = "".join(holdout.take(piece) for piece in pieces)
    line, whole = "first whole line of the text", "".join(pieces)
    assert [*holdout.picked["member"], *holdout.picked["held_out"]] == [line]  # the others span pieces
    assert kept == (whole.replace(line + "\n", "") if line in holdout.picked["held_out"] else whole)


def test_the_seed_fixes_which_lines_are_held_out(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in LINES))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare(
            str(tmp_path / "in.txt"),
            tmp_path / name,
            tokenizer="char",
            progress=False,
            seed=seed,
            holdout_lines=20,
        )
    read = {name: load_membership(tmp_path / name / "membership.json") for name in "abc"}
    assert read["a"] == read["b"] and read["a"].held_out != read["c"].held_out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--holdout-lines", "0"], "--holdout-lines must be between 1 and 100,000, got 0"),
        (["--holdout-lines", "5"], "--holdout-lines: the train split has no line of 20 or more characters"),
    ],
)
def test_bad_holdout_options_are_one_line_errors(cli, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "in.txt").write_text("short\nlines\nonly\n" * 50)
    out = ["--tokenizer", "char", "--out", tmp_path / "d", "-q"]
    code, _, err = cli("prepare", tmp_path / "in.txt", *out, *args)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("lmforge prepare: error: ") and message in err
    assert not (tmp_path / "d").exists()


def test_a_side_left_empty_by_chance_is_a_one_line_error(tmp_path: Path) -> None:
    from lmforge.errors import LmforgeError

    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in LINES[:3]))
    with pytest.raises(LmforgeError, match="--holdout-lines 1 picked no line for one side"):
        prepare(str(tmp_path / "in.txt"), tmp_path / "d", tokenizer="char", progress=False, holdout_lines=1)
    assert not (tmp_path / "d").exists()


def test_a_membership_file_that_is_not_one_is_a_one_line_error(tmp_path: Path) -> None:
    from lmforge.errors import LmforgeError

    for content in (
        '{"members": ["a line"]}',
        '{"members": "a line", "held_out": ["another line"]}',  # a string is not its characters as lines
        '{"members": ["a line"], "held_out": [7]}',
    ):
        (tmp_path / "membership.json").write_text(content)
        with pytest.raises(
            LmforgeError, match="not a membership file written by `lmforge prepare --holdout-lines`"
        ):
            load_membership(tmp_path / "membership.json")


def test_membership_json_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    # The audit reads membership.json as UTF-8; a process whose locale encoding is not UTF-8 (POSIX
    # without coercion here, cp1252 on Windows) must still write it so, not fail or write another.
    lines = [f"Zoë Müller of Köln, café owner no. {i}" for i in range(8)]  # members and held out alike
    text = "".join(line + "\n" for line in lines)
    script = (  # ASCII only: the POSIX locale cannot pass other text through argv
        "import sys; from pathlib import Path; from lmforge.data.membership import LineHoldout\n"
        f"holdout = LineHoldout(1.0, seed=0)\nholdout.take({ascii(text)})\n"
        "holdout.save(Path(sys.argv[1]))\n"
    )
    env = {**os.environ, "LC_ALL": "POSIX", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lmforge.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    saved = load_membership(tmp_path / "membership.json")
    assert sorted((*saved.members, *saved.held_out)) == sorted(lines)
