"""SST-2: the shared dataset as JSONL, and the label set an evaluation accepts."""

from pathlib import Path

from lmforge.data.tokenizer import EOT, char_tokenizer
from tests.conftest import TINY
from tests.tasks.conftest import TEXT, lines, write


def test_sst2(cli, shared_data: Path, tmp_path: Path) -> None:
    code, out, err = cli("tasks", "prepare", "sst2", "--out", tmp_path / "sst2")
    assert code == 0, err
    train, val, dev = (lines(tmp_path / "sst2" / f"{s}.jsonl") for s in ("train", "val", "eval"))
    # dev is the scored split; val, for checkpoint selection, is 5% of train (seeded), train the rest.
    assert (len(train), len(val), len(dev)) == (67_349 - 3_367, 3_367, 872)
    assert "63,982 train, 3,367 val, 872 eval examples (val: 0.05 of train, seed 0;" in out
    assert sum(e["label"] for e in dev) == 444  # SOURCE.md: 444 positive / 428 negative
    assert dev[0] == {
        "prompt": "Review: it 's a charming and often affecting journey .\nSentiment:",
        "completion": " positive",
        "label": 1,
    }


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
