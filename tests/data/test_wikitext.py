"""`wikitext-2` as an evaluation corpus for a model trained elsewhere: encoded with that model's
tokenizer (given as its run or data folder), its whole test file scored by `lmforge eval --data`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import TINY


def test_wikitext2_is_encoded_with_a_runs_tokenizer_and_its_test_file_scored_whole(
    cli, shared_data: Path, tmp_path: Path
) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    (tmp_path / "base.txt").write_text(text)
    code, _, err = cli("prepare", tmp_path / "base.txt", "--tokenizer", "bpe", "--vocab-size", "300",
                       "--out", tmp_path / "data", "-q")  # fmt: skip
    assert code == 0, err
    settings = [*TINY, f"data.dir={tmp_path / 'data'}", "train.max_steps=2", "train.eval_interval=0"]
    code, _, err = cli("train", "--out", tmp_path / "run", *[a for s in settings for a in ("--set", s)])
    assert code == 0, err

    code, _, err = cli(
        "prepare", "wikitext-2", "--tokenizer", tmp_path / "run", "--out", tmp_path / "wt2", "-q"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "wt2" / "meta.json").read_text())
    sizes = [
        (shared_data / "wikitext-2" / name).stat().st_size for name in ("wiki.valid.raw", "wiki.test.raw")
    ]
    assert (meta["split"], meta["train_bytes"], meta["val_bytes"]) == ("given", *sizes)
    assert (tmp_path / "wt2" / "tokenizer.json").read_bytes() == (
        tmp_path / "data" / "tokenizer.json"
    ).read_bytes()

    code, out, err = cli(
        "eval", tmp_path / "run", "--data", tmp_path / "wt2", "--json", "--batch-size", "256"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["data"] == str(tmp_path / "wt2")
    # Every token of wiki.test.raw but the first is a target (windows of block_size, nothing overlaps).
    assert result["tokens"] == meta["val_tokens"] - 1
    assert result["bpb"] == pytest.approx(result["val_loss"] / math.log(2) / (sizes[1] / meta["val_tokens"]))
