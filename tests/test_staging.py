"""The one rule for output folders: lmforge replaces only what it wrote, never what it reads or stands in."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.staging import MARKER, check_out, folder_kind, remove_stale_staging, staged_folder, write_marker
from tests.conftest import TINY, snapshot


def user_folder(path: Path) -> Path:
    """A folder of the user's own files, which lmforge must never delete."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "thesis").mkdir()
    (path / "thesis" / "draft.md").write_text("chapter 1\n")
    return path


def lmforge_folder(path: Path, kind: str) -> Path:
    path.mkdir(parents=True)
    write_marker(path, kind)
    (path / "file.bin").write_bytes(b"old")
    return path


def test_staged_folder_arrives_with_a_marker_of_its_kind(tmp_path: Path) -> None:
    with staged_folder(tmp_path / "out", "export", overwrite=False) as staging:
        (staging / "config.json").write_text("{}")
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["kind"] == "export" and "version" in marker
    assert folder_kind(tmp_path / "out") == "export"


def test_overwrite_replaces_a_folder_lmforge_wrote_of_the_same_kind(tmp_path: Path) -> None:
    out = lmforge_folder(tmp_path / "out", "data")
    with staged_folder(out, "data", overwrite=True) as staging:
        (staging / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.bin"]


def test_overwrite_refuses_a_folder_of_user_files(tmp_path: Path) -> None:
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    with pytest.raises(LmforgeError, match="was not written by lmforge"):
        check_out(out, "data", overwrite=True)
    assert snapshot(out) == before


def test_overwrite_refuses_an_lmforge_folder_of_another_kind(tmp_path: Path) -> None:
    out = lmforge_folder(tmp_path / "run", "run")
    with pytest.raises(LmforgeError, match="holds an lmforge run folder, not a Hugging Face export"):
        check_out(out, "export", overwrite=True)
    assert (out / "file.bin").read_bytes() == b"old"


def test_an_unreadable_marker_is_not_trusted(tmp_path: Path) -> None:
    out = user_folder(tmp_path / "mine")
    (out / MARKER).write_text("not json")
    with pytest.raises(LmforgeError, match="was not written by lmforge"):
        check_out(out, "data", overwrite=True)


@pytest.mark.parametrize(
    ("files", "kind", "accepted"),
    [
        (["checkpoints/step-0000010/meta.json", "config.toml"], "run", True),
        (["meta.json", "train.bin"], "data", True),
        (["config.toml", "notes.txt"], "run", False),  # a config alone is not a run
        (["meta.json", "val.bin"], "data", False),
        (["checkpoints/step-0000010/meta.json", "config.toml"], "data", False),
    ],
)
def test_folders_of_older_lmforge_without_a_marker(
    tmp_path: Path, files: list, kind: str, accepted: bool
) -> None:
    out = tmp_path / "old"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    if accepted:
        check_out(out, kind, overwrite=True)
    else:
        with pytest.raises(LmforgeError):
            check_out(out, kind, overwrite=True)


def test_without_overwrite_a_non_empty_folder_is_kept(tmp_path: Path) -> None:
    out = lmforge_folder(tmp_path / "out", "data")
    with pytest.raises(LmforgeError, match="exists and is not empty; pass --overwrite"):
        check_out(out, "data", overwrite=False)
    check_out(tmp_path / "missing", "data", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "data", overwrite=False)


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        (".", "is the working folder"),
        ("../work", "is the working folder"),
        ("../link-to-work", "is the working folder"),  # symlinks are resolved
        ("..", "contains the working folder"),
        ("/", "contains the working folder"),
    ],
)
def test_the_working_folder_and_its_parents_are_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, reason: str
) -> None:
    work = lmforge_folder(tmp_path / "work", "data")  # even one that lmforge wrote
    write_marker(tmp_path, "data")
    (tmp_path / "link-to-work").symlink_to(work)
    monkeypatch.chdir(work)
    with pytest.raises(LmforgeError, match=reason):
        check_out(Path(out), "data", overwrite=True)
    assert (work / "file.bin").read_bytes() == b"old"


def test_the_working_folder_is_refused_even_when_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmforgeError, match="is the working folder"):
        check_out(Path("."), "data", overwrite=False)


def test_home_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = lmforge_folder(tmp_path / "home", "data")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(LmforgeError, match="is the home folder"):
        check_out(home, "data", overwrite=True)
    with pytest.raises(LmforgeError, match="contains the home folder"):
        check_out(tmp_path, "data", overwrite=True)


def test_the_input_and_folders_that_contain_it_are_never_replaced(tmp_path: Path) -> None:
    source = lmforge_folder(tmp_path / "parent" / "source", "data")
    parent = tmp_path / "parent"
    write_marker(parent, "data")
    (tmp_path / "link").symlink_to(parent)
    with pytest.raises(LmforgeError, match="is the input"):
        check_out(source, "data", overwrite=True, inputs=[source])
    for out in (parent, tmp_path / "link", source / ".." / ".."):
        with pytest.raises(LmforgeError, match="contains the input"):
            check_out(out, "data", overwrite=True, inputs=[source / "file.bin"])
    assert (source / "file.bin").read_bytes() == b"old"


def test_a_file_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with pytest.raises(LmforgeError, match="is not a folder"):
        check_out(tmp_path / "file", "data", overwrite=True)


# ----------------------------------------------------------------------------- through the CLI


def test_prepare_out_dot_is_refused(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "corpus.txt").write_text("some text to tokenize\n" * 50)
    work = user_folder(tmp_path / "work")
    before = snapshot(work)
    monkeypatch.chdir(work)
    code, _, err = cli(
        "prepare", tmp_path / "corpus.txt", "--tokenizer", "char", "--out", ".", "--overwrite", "-q"
    )
    assert code == 1 and "is the working folder" in err and err.count("\n") == 1
    assert snapshot(work) == before


def test_train_out_dot_is_refused(
    cli, char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = user_folder(tmp_path / "work")
    before = snapshot(work)
    monkeypatch.chdir(work)
    sets = sum((["--set", s] for s in [*TINY, f"data.dir={char_data}"]), [])
    code, _, err = cli("train", "--out", ".", "--overwrite", *sets)
    assert code == 1 and "is the working folder" in err and err.count("\n") == 1
    assert snapshot(work) == before and sorted(os.listdir(work)) == ["notes.txt", "thesis"]


def test_a_staging_folder_left_by_a_killed_process_is_removed_by_the_next_save_of_that_output(
    tmp_path: Path,
) -> None:
    """kill -9 during `prepare` leaves its hidden staging folder (a corpus's shards, perhaps GBs); the
    next save of the same output removes it, but never one that a live process is filling."""
    two_minutes_ago = (time.time() - 120, time.time() - 120)
    left = tmp_path / ".tmp-data-k1ll3d"  # as staged() names it, with no process behind it
    left.mkdir()
    (left / "train.bin").write_bytes(b"\0" * 1000)
    os.utime(left, two_minutes_ago)
    with staged_folder(tmp_path / "data", "data", overwrite=False) as live:
        (live / "train.bin").write_bytes(b"\1")
        os.utime(live, two_minutes_ago)  # a long prepare: only its lock says it is in use
        remove_stale_staging(tmp_path, name="data")  # what another save of "data" does first
        assert not left.exists()
        assert live.is_dir()
    assert (tmp_path / "data" / "train.bin").read_bytes() == b"\1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_save_leaves_hidden_folders_that_are_not_its_own_leftovers(tmp_path: Path) -> None:
    """Another output's leftovers, a hidden folder of the user's, and a retired output that is the
    only copy left (a replace killed between its two renames) all survive a save beside them."""
    two_minutes_ago = (time.time() - 120, time.time() - 120)
    kept = [".tmp-data-k1ll3d", ".tmp-mine", ".tmp-export-old-4242", ".tmp-data-2-old-77"]
    for name in kept:
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, two_minutes_ago)
    with staged_folder(tmp_path / "export", "export", overwrite=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "export"])
    with staged_folder(tmp_path / "export", "export", overwrite=True):  # "export" exists now:
        pass  # the retired copy is superseded
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-data-2-old-77",
        ".tmp-data-k1ll3d",
        ".tmp-mine",
        "export",
    ]
    with staged_folder(tmp_path / "data", "data", overwrite=False):  # its leftover goes; "data-2"'s
        pass  # retired copy stays while "data-2" is missing
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-data-2-old-77", ".tmp-mine", "data", "export"]
