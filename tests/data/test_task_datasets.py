"""The files `lmforge tasks prepare` reads come from $LMFORGE_DATA_DIR, then the cache, then a
download checked against a pinned sha256. Downloads here read local files through `file://` URLs
(urllib's own handler): no network."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.data import sources
from lmforge.errors import LmforgeError
from lmforge.tasks import prepare_task, write_task_text
from tests.conftest import DATASETS
from tests.fixtures.pinned import pinned_to
from tests.tasks.conftest import lines

ROWS = "sentence\tlabel\na fine film \t1\na dull film \t0\nsharp and funny \t1\n"


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """SST-2 published at a file:// URL and pinned to it; no data dir, an empty cache, downloads allowed."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (site / name).write_text(ROWS)
    pins = tuple(
        replace(
            pinned_to(tmp_path, replace(part, name="site")), name="sst2", url=(site / part.filename).as_uri()
        )
        for part in sources.TASK_DATASETS["sst2"]
    )
    monkeypatch.setitem(sources.TASK_DATASETS, "sst2", pins)
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "nodata"))
    monkeypatch.setenv("LMFORGE_OFFLINE", "0")
    return site


def cached(folder: str, filename: str) -> Path:
    return sources.cache_dir() / "datasets" / folder / filename


def test_a_task_file_missing_locally_is_downloaded_verified_and_cached(
    upstream: Path, tmp_path: Path
) -> None:
    prepared = prepare_task("sst2", tmp_path / "out")
    assert prepared.counts["eval"] == 3 and cached("sst2", "train.tsv").read_text() == ROWS
    (upstream / "train.tsv").unlink()  # the second time, the cache serves it
    assert prepare_task("sst2", tmp_path / "again") == prepared


def test_the_data_dir_comes_before_the_cache(upstream: Path, monkeypatch, tmp_path: Path) -> None:
    sources.task_file("sst2", "train.tsv")  # now cached
    shared = tmp_path / "shared" / "sst2"
    shared.mkdir(parents=True)
    shutil.copy(upstream / "train.tsv", shared / "train.tsv")
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "shared"))
    assert sources.task_file("sst2", "train.tsv") == shared / "train.tsv"
    (shared / "train.tsv").unlink()
    assert sources.task_file("sst2", "train.tsv") == cached("sst2", "train.tsv")


def test_a_download_with_another_sha256_is_refused_and_not_kept(upstream: Path, tmp_path: Path) -> None:
    (upstream / "train.tsv").write_text(ROWS.replace("fine", "fina"))  # same size, other bytes
    with pytest.raises(LmforgeError, match=r"download of 'sst2' from file://.* has sha256 .*, expected"):
        sources.task_file("sst2", "train.tsv")
    assert not cached("sst2", "train.tsv").exists()


def test_a_local_copy_with_another_sha256_is_an_error_not_skipped(
    upstream: Path, monkeypatch, tmp_path
) -> None:
    (tmp_path / "shared" / "sst2").mkdir(parents=True)
    (tmp_path / "shared" / "sst2" / "train.tsv").write_text("sentence\tlabel\nedited\t1\n")
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "shared"))
    with pytest.raises(LmforgeError, match=r"train.tsv: sha256 .* does not match the pinned"):
        sources.task_file("sst2", "train.tsv")


def test_offline_a_missing_task_file_is_a_one_line_error(cli, upstream: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    code, _, err = cli("tasks", "prepare", "sst2", "--out", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and "LMFORGE_OFFLINE=1 forbids downloading it" in err
    assert "train.tsv is not in" in err and not (tmp_path / "out").exists()


def test_every_task_file_of_the_shared_folder_matches_its_pin(shared_data: Path) -> None:
    found = 0  # (the small copies, where the shared folder is missing, are pinned to themselves)
    for parts in sources.TASK_DATASETS.values():
        for part in parts:
            if (shared_data / part.name / part.filename).is_file():
                assert sources.local_copy(part, shared_data) == shared_data / part.name / part.filename
                found += 1
    # all but SQuAD's dev-v1.1.json (the folder holds it gzipped) and train-v1.1.json; fewer small copies
    assert found == 10 if DATASETS.real else found > 0


def squad_files(root: Path, *, train: bool) -> dict[str, object]:
    """A SQuAD folder under `root` with dev (gzipped, as the shared folder holds it) and, with `train`,
    an official-style train-v1.1.json; all pinned to themselves."""
    with gzip.open(DATASETS.root / "squad-v1.1" / "dev-v1.1.json.gz", "rt", encoding="utf-8") as f:
        dev = json.load(f)
    folder = root / "squad-v1.1"
    folder.mkdir(parents=True)
    with gzip.open(folder / "dev-v1.1.json.gz", "wt", encoding="utf-8") as f:
        json.dump({"data": dev["data"][:4], "version": "1.1"}, f)
    if train:
        (folder / "train-v1.1.json").write_text(json.dumps({"data": dev["data"][4:], "version": "1.1"}))
    return {"dev": dev["data"][:4], "train": dev["data"][4:]}


def pin_squad(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    pins = tuple(pinned_to(root, part) for part in sources.TASK_DATASETS["squad-v1.1"])
    monkeypatch.setitem(sources.TASK_DATASETS, "squad-v1.1", pins)
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(root))


def questions(articles: list[dict]) -> int:
    return sum(len(p["qas"]) for a in articles for p in a["paragraphs"])


def test_squad_trains_on_train_v1_1_and_scores_all_of_dev_where_it_is_found(monkeypatch, tmp_path) -> None:
    articles = squad_files(tmp_path / "shared", train=True)
    pin_squad(monkeypatch, tmp_path / "shared")
    prepared = prepare_task("squad", tmp_path / "qa")
    assert prepared.train_from.startswith("train-v1.1.json; eval: the whole dev-v1.1.json")
    assert prepared.counts["eval"] == questions(articles["dev"])
    assert prepared.counts["train"] + prepared.counts["val"] == questions(articles["train"])
    assert {e["title"] for e in lines(tmp_path / "qa" / "eval.jsonl")} == {
        a["title"] for a in articles["dev"]
    }


def test_squad_without_train_v1_1_offline_splits_dev_by_article(monkeypatch, tmp_path) -> None:
    articles = squad_files(tmp_path / "shared", train=False)
    pin_squad(monkeypatch, tmp_path / "shared")
    prepared = prepare_task("squad", tmp_path / "qa")
    assert prepared.train_from.startswith("the first half of dev-v1.1.json's articles")
    assert prepared.counts["eval"] == questions(articles["dev"][2:])


def test_squad_falls_back_to_dev_when_the_network_fails(monkeypatch, tmp_path, caplog) -> None:
    squad_files(tmp_path / "shared", train=False)
    pin_squad(monkeypatch, tmp_path / "shared")
    monkeypatch.setenv("LMFORGE_OFFLINE", "0")
    train = replace(sources.task_dataset("squad-v1.1", "train-v1.1.json"), url=(tmp_path / "gone").as_uri())
    pins = tuple(train if p.filename == train.filename else p for p in sources.TASK_DATASETS["squad-v1.1"])
    monkeypatch.setitem(sources.TASK_DATASETS, "squad-v1.1", pins)
    prepared = prepare_task("squad", tmp_path / "qa")
    assert prepared.train_from.startswith("the first half")
    assert (
        "could not download 'squad-v1.1'" in caplog.text and "half of the dev articles instead" in caplog.text
    )


def test_tasks_text_writes_the_sentences_and_the_prompt_words(cli, upstream: Path, tmp_path: Path) -> None:
    code, out, err = cli("tasks", "text", "sst2", "--out", tmp_path / "sst2.txt")
    assert code == 0, err
    text = (tmp_path / "sst2.txt").read_text()
    assert text == "a fine film\na dull film\nsharp and funny\nReview: \nSentiment: positive negative\n"
    code, _, err = cli("tasks", "text", "sst2", "--out", tmp_path / "sst2.txt")
    assert code == 1 and "exists (use --overwrite" in err


def test_tasks_text_for_squad_joins_a_prepared_folders_training_examples(tmp_path: Path) -> None:
    prepare_task("squad", tmp_path / "qa")
    write_task_text("squad", tmp_path / "squad.txt", prepared=tmp_path / "qa")
    train = lines(tmp_path / "qa" / "train.jsonl")
    expected = "\n\n".join(r["prompt"] + r["completion"] for r in train) + "\n"
    assert (tmp_path / "squad.txt").read_text() == expected
    with pytest.raises(LmforgeError, match="give --prepared DIR"):
        write_task_text("squad", tmp_path / "other.txt")
