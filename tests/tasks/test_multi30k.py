"""Multi30k: the shared parallel text as JSONL."""

from pathlib import Path

from lmforge.tasks import prepare_task
from tests.tasks.conftest import lines


def test_multi30k(shared_data: Path, tmp_path: Path) -> None:
    counts = prepare_task("multi30k", tmp_path / "mt")
    assert counts == {"train": 29_000, "valid": 1_014, "eval": 1_000}
    first = lines(tmp_path / "mt" / "eval.jsonl")[0]
    assert (
        first["prompt"] == f"English: {first['source']}\nGerman:"
        and first["completion"] == " " + first["reference"]
    )
