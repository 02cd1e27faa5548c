"""The registry of `lmforge.tasks` and its entry points as the CLI uses them."""

from pathlib import Path

import pytest

from lmforge.cli import build_parser
from lmforge.errors import LmforgeError
from lmforge.tasks import TASKS, prepare_task, tasks_with_datasets
from lmforge.tasks.base import EvalRun, Task
from tests.conftest import snapshot


def test_the_registry_lists_every_task_module_and_the_cli_offers_its_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert list(TASKS) == ["sst2", "multi30k", "squad", "generate", "cloze", "crows-pairs"]
    # generate has no built-in dataset; cloze is made from a corpus (--from); crows-pairs is scored on
    # its own dataset file, with nothing to prepare
    assert tasks_with_datasets() == ("sst2", "multi30k", "squad", "cloze")

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
    assert code == 1 and "train.tsv is not in" in err and "LMFORGE_OFFLINE=1 forbids downloading it" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def fake_sst2_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A tiny stand-in for the shared SST-2 files, pinned to its own hashes."""
    from lmforge.data import sources
    from tests.fixtures.pinned import pinned_to

    root = tmp_path / "shared"
    (root / "sst2").mkdir(parents=True)
    rows = "sentence\tlabel\na fine film\t1\na dull film\t0\n"
    (root / "sst2" / "train.tsv").write_text(rows)
    (root / "sst2" / "dev.tsv").write_text(rows)
    pins = tuple(pinned_to(root, part) for part in sources.TASK_DATASETS["sst2"])
    monkeypatch.setitem(sources.TASK_DATASETS, "sst2", pins)
    return root


def test_tasks_prepare_never_replaces_its_own_source(cli, fake_sst2_source: Path) -> None:
    source = fake_sst2_source
    before = snapshot(source)
    code, _, err = cli("tasks", "prepare", "sst2", "--data-dir", source, "--out", source, "--overwrite")
    assert code == 1 and "is the input" in err and err.count("\n") == 1
    assert snapshot(source) == before


def test_tasks_prepare_overwrite_replaces_an_earlier_task_folder(cli, fake_sst2_source, tmp_path) -> None:
    source = fake_sst2_source
    out = tmp_path / "sst2"
    assert cli("tasks", "prepare", "sst2", "--data-dir", source, "--out", out)[0] == 0
    assert cli("tasks", "prepare", "sst2", "--data-dir", source, "--out", out)[0] == 1
    (out / "extra.jsonl").write_text("")
    code, _, err = cli("tasks", "prepare", "sst2", "--data-dir", source, "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".lmforge", "eval.jsonl", "train.jsonl", "val.jsonl"]
