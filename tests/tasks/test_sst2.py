"""SST-2: the shared dataset as JSONL, and the label set an evaluation accepts."""

import csv
from pathlib import Path

from lmforge.data.tokenizer import EOT, char_tokenizer
from tests.conftest import DATASETS, TINY
from tests.tasks.conftest import TEXT, lines, write


def test_sst2(cli, shared_data: Path, tmp_path: Path) -> None:
    code, out, err = cli("tasks", "prepare", "sst2", "--out", tmp_path / "sst2")
    assert code == 0, err
    train, val, dev = (lines(tmp_path / "sst2" / f"{s}.jsonl") for s in ("train", "val", "eval"))
    rows = {}
    for name in ("train", "dev"):
        with open(shared_data / "sst2" / f"{name}.tsv", encoding="utf-8", newline="") as f:
            rows[name] = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    # dev is the scored split; val, for checkpoint selection, is 5% of train (seeded), train the rest.
    n_val = round(len(rows["train"]) * 0.05)
    assert (len(train), len(val), len(dev)) == (len(rows["train"]) - n_val, n_val, len(rows["dev"]))
    assert (
        f"{len(train):,} train, {n_val:,} val, {len(dev):,} eval examples (val: 0.05 of train, seed 0;" in out
    )
    assert [e["label"] for e in dev] == [int(row["label"]) for row in rows["dev"]]
    assert dev[0] == {
        "prompt": f"Review: {rows['dev'][0]['sentence'].strip()}\nSentiment:",
        "completion": " positive" if rows["dev"][0]["label"] == "1" else " negative",
        "label": int(rows["dev"][0]["label"]),
    }
    if DATASETS.real:  # SOURCE.md: 67,349 train; dev 872, 444 positive / 428 negative
        assert (len(rows["train"]), len(dev), sum(e["label"] for e in dev)) == (67_349, 872, 444)
        assert dev[0]["prompt"] == "Review: it 's a charming and often affecting journey .\nSentiment:"


def test_label_set_mismatch_is_an_error(cli, tmp_path: Path) -> None:
    write(tmp_path / "bad", [{"prompt": "Review: x\nSentiment:", "completion": " positive", "label": 3}])
    char_tokenizer(TEXT, specials=[EOT]).save(str(tmp_path / "tok.json"))
    args = [
        "finetune",
        "--out",
        tmp_path / "run",
        "--set",
        f"data.dir={tmp_path / 'bad'}",
        "--set",
        f"data.tokenizer={tmp_path / 'tok.json'}",
        *sum((["--set", s] for s in TINY), []),
        "--set",
        "train.max_steps=2",
    ]
    assert cli(*args)[0] == 0
    code, _, err = cli("eval", tmp_path / "run", "--task", "sst2")
    assert code == 1 and "labels [3] are outside the label set 0/1" in err
