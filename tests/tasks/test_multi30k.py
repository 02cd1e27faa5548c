"""Multi30k: the shared parallel text as JSONL."""

import gzip
from pathlib import Path

from lmforge.tasks import prepare_task
from tests.conftest import DATASETS
from tests.tasks.conftest import lines


def test_multi30k(shared_data: Path, tmp_path: Path) -> None:
    prepared = prepare_task("multi30k", tmp_path / "mt")
    sizes = {}
    for split, file in [("train", "train"), ("val", "val"), ("eval", "test_2016_flickr")]:
        with gzip.open(shared_data / "multi30k" / f"{file}.de.gz", "rt", encoding="utf-8") as f:
            sizes[split] = sum(1 for _ in f)
    assert prepared.counts == sizes
    if DATASETS.real:
        assert sizes == {"train": 29_000, "val": 1_014, "eval": 1_000}  # SOURCE.md
    assert prepared.val_from == "the dataset's validation split"
    first = lines(tmp_path / "mt" / "eval.jsonl")[0]
    assert (
        first["prompt"] == f"English: {first['source']}\nGerman:"
        and first["completion"] == " " + first["reference"]
    )
