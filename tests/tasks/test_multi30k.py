"""Multi30k: the shared parallel text as JSONL."""

from pathlib import Path

from lmforge.tasks import prepare_task
from tests.tasks.conftest import lines


def test_multi30k(shared_data: Path, tmp_path: Path) -> None:
    prepared = prepare_task("multi30k", tmp_path / "mt")
    assert prepared.counts == {"train": 29_000, "val": 1_014, "eval": 1_000}
    assert prepared.val_from == "the dataset's validation split"
    first = lines(tmp_path / "mt" / "eval.jsonl")[0]
    assert (
        first["prompt"] == f"English: {first['source']}\nGerman:"
        and first["completion"] == " " + first["reference"]
    )
