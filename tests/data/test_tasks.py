import json
from pathlib import Path

import pytest

from lmforge.data.tasks import prepare_task
from lmforge.errors import LmforgeError


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sst2(cli, shared_data: Path, tmp_path: Path) -> None:
    code, out, err = cli("tasks", "prepare", "sst2", "--out", tmp_path / "sst2")
    assert code == 0, err
    train, dev = lines(tmp_path / "sst2" / "train.jsonl"), lines(tmp_path / "sst2" / "eval.jsonl")
    assert (len(train), len(dev)) == (67_349, 872)
    assert sum(e["label"] for e in dev) == 444  # SOURCE.md: 444 positive / 428 negative
    assert dev[0] == {
        "prompt": "Review: it 's a charming and often affecting journey .\nSentiment:",
        "completion": " positive",
        "label": 1,
    }


def test_multi30k(shared_data: Path, tmp_path: Path) -> None:
    counts = prepare_task("multi30k", tmp_path / "mt")
    assert counts == {"train": 29_000, "valid": 1_014, "eval": 1_000}
    first = lines(tmp_path / "mt" / "eval.jsonl")[0]
    assert (
        first["prompt"] == f"English: {first['source']}\nGerman:"
        and first["completion"] == " " + first["reference"]
    )


def test_squad_is_split_by_article(shared_data: Path, tmp_path: Path) -> None:
    counts = prepare_task("squad", tmp_path / "qa")
    assert counts["train"] + counts["eval"] == 10_570
    train, held_out = lines(tmp_path / "qa" / "train.jsonl"), lines(tmp_path / "qa" / "eval.jsonl")
    assert not {e["title"] for e in train} & {e["title"] for e in held_out}
    assert len({e["title"] for e in train}) == 24 and train[0]["title"] == "Super_Bowl_50"
    assert all(
        e["completion"] == " " + e["answers"][0] and e["answers"][0] in e["prompt"] for e in train[:50]
    )
    assert prepare_task("squad", tmp_path / "again") == counts  # deterministic


def test_task_errors(cli, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="unknown task 'imdb'"):
        prepare_task("imdb", tmp_path / "x")
    code, _, err = cli("tasks", "prepare", "sst2", "--out", tmp_path / "x", "--data-dir", tmp_path / "empty")
    assert code == 1 and "train.tsv: not found" in err
    assert not (tmp_path / "x").exists()
