"""The registry of `lmforge.tasks` and its entry points as the CLI uses them."""

from pathlib import Path

import pytest

from lmforge.cli import build_parser
from lmforge.errors import LmforgeError
from lmforge.tasks import TASKS, prepare_task, tasks_with_datasets
from lmforge.tasks.base import EvalRun, Task


def test_the_registry_lists_every_task_module_and_the_cli_offers_its_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert list(TASKS) == ["sst2", "multi30k", "squad", "generate"]
    assert tasks_with_datasets() == ("sst2", "multi30k", "squad")  # generate has no built-in dataset

    class Toy(Task):
        name, fields = "toy", ("prompt",)

        def splits(self, root: Path) -> dict:
            return {}

        def evaluate(self, run: EvalRun, records: list[dict]) -> dict:
            return {}

    monkeypatch.setitem(TASKS, "toy", Toy())
    parser = build_parser()
    assert parser.parse_args(["eval", "run", "--task", "toy"]).task == "toy"
    assert parser.parse_args(["tasks", "prepare", "toy", "--out", "x"]).task == "toy"
    with pytest.raises(SystemExit):
        parser.parse_args(["tasks", "prepare", "generate", "--out", "x"])


def test_task_errors(cli, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="unknown task 'imdb'"):
        prepare_task("imdb", tmp_path / "x")
    code, _, err = cli("tasks", "prepare", "sst2", "--out", tmp_path / "x", "--data-dir", tmp_path / "empty")
    assert code == 1 and "train.tsv: not found" in err
    assert not (tmp_path / "x").exists()
