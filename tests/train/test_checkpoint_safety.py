"""Checkpoints that must not hurt: crafted DCP metadata, corrupt or odd checkpoint folders, two
processes on one run folder, a full disk during a save, shards that never reached the folder."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.files import file_sha256
from lmforge.staging import write_marker
from lmforge.train.trainer import train
from tests.conftest import TINY
from tests.train.conftest import read_metrics

# Two checkpoints (steps 4 and 8) of an 8-step run.
SHORT = [*TINY, "train.max_steps=8", "train.eval_interval=4", "train.checkpoint_interval=4"]


def train_args(config_file: Path, out: Path, *extra: str) -> list:
    return ["train", config_file, "--out", out, *sum((["--set", s] for s in [*SHORT, *extra]), [])]


@pytest.fixture(scope="module")
def sharded_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-step run with parallel.strategy = ddp in one plain process: DCP checkpoints at world size 1."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    train(load_config(None, [f"data.dir={char_data}", *SHORT, "parallel.strategy=ddp"]), out)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_metrics(run)[0]]


def rehash(checkpoint: Path, name: str) -> None:
    """Record `name`'s current sha256 in meta.json, as whoever altered the file could."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"][name] = file_sha256(checkpoint / name)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


class CreatesFile:
    """A pickle that creates `marker` when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_crafted_dcp_metadata_is_refused_without_running_it(cli, sharded_run: Path, tmp_path: Path) -> None:
    run = copy_of(sharded_run, tmp_path)
    newest = ckpt.list_checkpoints(run)[-1].path
    marker = tmp_path / "pwned"
    (newest / ckpt.TRAIN_STATE / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    rehash(newest, f"{ckpt.TRAIN_STATE}/.metadata")  # the sha256 list sits in the same folder
    code, _, err = cli("train", "--out", run, "--resume")
    assert not marker.exists()
    assert code == 1 and err.count("\n") == 1
    assert f"{newest / ckpt.TRAIN_STATE / '.metadata'}: refused" in err and "posix.system" in err


@pytest.mark.slow
def test_crafted_dcp_byte_item_is_refused_without_running_it(cli, sharded_run: Path, tmp_path: Path) -> None:
    """A non-tensor item (an optimizer setting) pointed at a pickle that creates a file when loaded."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    run = copy_of(sharded_run, tmp_path)
    folder = ckpt.list_checkpoints(run)[-1].path / ckpt.TRAIN_STATE
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # the test trusts its own checkpoint
    item = next(
        index
        for index in metadata.storage_data
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    )
    marker = tmp_path / "pwned"
    payload = pickle.dumps(CreatesFile(marker), protocol=2)  # torch.load's own protocol
    shard = folder / metadata.storage_data[item].relative_path
    metadata.storage_data[item] = _StorageInfo(shard.name, shard.stat().st_size, len(payload))
    shard.write_bytes(shard.read_bytes() + payload)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    for name in (shard.name, ".metadata"):
        rehash(folder.parent, f"{ckpt.TRAIN_STATE}/{name}")
    code, _, err = cli("train", "--out", run, "--resume")
    assert not marker.exists()
    assert code == 1 and err.count("\n") == 1
    assert f"{folder}: refused to load {item.fqn}" in err and "posix.system" in err


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_state_pt(cli, config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(*train_args(config_file, run))[0] == 0
    uninterrupted = losses(run)
    newest = ckpt.list_checkpoints(run)[-1].path
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    code, _, err = cli(*train_args(config_file, run), "--resume")
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert f"{newest}: corrupted checkpoint (state.pt does not match its sha256" in warning
    assert "resuming from" in warning and "step-0000004" in warning
    assert losses(run) == uninterrupted  # steps 5-8 again, from step 4
    ckpt.verify_checkpoint(newest)  # written anew


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_dcp_shard(cli, sharded_run: Path, tmp_path: Path) -> None:
    run = copy_of(sharded_run, tmp_path)
    newest = ckpt.list_checkpoints(run)[-1].path
    (shard,) = (newest / ckpt.TRAIN_STATE).glob("__0_*.distcp")
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = cli("train", "--out", run, "--resume")
    assert code == 0, err
    assert f"warning: {newest}: corrupted checkpoint ({ckpt.TRAIN_STATE}/{shard.name} does not match" in err
    assert losses(run) == losses(sharded_run)


def test_a_corrupt_state_pt_is_reported_in_one_line(cli, config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(*train_args(config_file, run, "train.max_steps=4"))[0] == 0  # one checkpoint: no fallback
    (only,) = ckpt.list_checkpoints(run)
    with open(only.path / "state.pt", "ab") as state:
        state.write(b"\0")  # altered, not truncated: torch.load might even read it
    code, _, err = cli(*train_args(config_file, run, "train.max_steps=4"), "--resume")
    assert code == 1 and err.count("\n") == 1
    assert f"{only.path}: corrupted checkpoint (state.pt does not match its sha256" in err


def fake_checkpoint(run: Path, step: int, val_loss: float | None) -> Path:
    path = run / ckpt.CHECKPOINTS / f"{ckpt.PREFIX}{step:07d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "val_loss": val_loss, "sha256": {}}))
    return path


def test_checkpoint_folders_without_valid_meta_are_ignored(tmp_path: Path) -> None:
    real = fake_checkpoint(tmp_path, 20, 2.0)
    garbage = tmp_path / ckpt.CHECKPOINTS / "step-0000099"
    garbage.mkdir()
    (garbage / "meta.json").write_text("{not json")
    (tmp_path / ckpt.CHECKPOINTS / "step-0000098").mkdir()  # no meta.json at all
    assert [c.path for c in ckpt.list_checkpoints(tmp_path)] == [real]
    assert ckpt.resolve_checkpoint(tmp_path, "last") == real
    ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert garbage.is_dir()  # not a checkpoint: never deleted either


@pytest.mark.slow
def test_resume_ignores_a_folder_with_garbage_meta(cli, config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(*train_args(config_file, run, "train.max_steps=4"))[0] == 0
    garbage = run / ckpt.CHECKPOINTS / "step-0000099"
    garbage.mkdir()
    (garbage / "meta.json").write_text("garbage")
    code, _, err = cli(*train_args(config_file, run, "train.max_steps=6"), "--resume")
    assert code == 0, err
    assert [e["step"] for e in read_metrics(run)[0]] == list(range(1, 7))


def test_pruning_keeps_the_newest_verified_checkpoint(tmp_path: Path) -> None:
    """A resume fell back from a corrupt step 30 to step 20 and has just saved step 25: step 25 is the
    newest checkpoint that verifies; it and the one before it stay, the best stays, step 30 is left
    for the run to replace when it gets there."""
    best = fake_checkpoint(tmp_path, 10, 1.0)
    fake_checkpoint(tmp_path, 15, 3.0)
    before = fake_checkpoint(tmp_path, 20, 3.0)
    corrupt = fake_checkpoint(tmp_path, 30, 2.0)
    saved = fake_checkpoint(tmp_path, 25, None)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, newest_step=25)
    assert [c.path for c in ckpt.list_checkpoints(tmp_path)] == [best, before, saved, corrupt]
    ckpt.prune_checkpoints(tmp_path, keep_last=1)  # no step given: the newest by number, as before
    assert [c.path for c in ckpt.list_checkpoints(tmp_path)] == [best, corrupt]


HOLD_LOCK = (
    "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    "print('locked', flush=True); time.sleep(300)"
)


def test_a_run_folder_in_use_is_refused(cli, config_file: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "run")  # an lmforge run folder, which --overwrite may replace when it is free
    (run / "metrics.jsonl").write_text("earlier run\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        for flag in ("--resume", "--overwrite"):
            code, _, err = cli(*train_args(config_file, run, "train.max_steps=2"), flag)
            assert code == 1 and err.count("\n") == 1, err
            assert f"{run} is in use by another lmforge process" in err
        assert (run / "metrics.jsonl").read_text() == "earlier run\n"
    finally:
        holder.kill()
        holder.wait()
    held = []

    def probe(self, step: int, val_loss: float | None) -> Path:  # is the lock held during the run?
        with open(run / ".lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return real_save(self, step, val_loss)

    real_save = ckpt.Checkpointer.save
    monkeypatch.setattr(ckpt.Checkpointer, "save", probe)
    code, _, err = cli(*train_args(config_file, run, "train.max_steps=2"), "--overwrite")
    assert code == 0, err
    assert held == [True]
    assert not (run / "metrics.jsonl").read_text().startswith("earlier run")


def test_a_file_system_without_locks_gets_a_warning_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lustre mounted without `flock`, for one, answers ENOSYS: the run goes on, unprotected, and says so."""
    from lmforge import staging

    def unsupported(*args: object) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(staging.fcntl, "flock", unsupported)
    with staging.locked(tmp_path / "run"):
        (tmp_path / "run" / "metrics.jsonl").write_text("")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {tmp_path / 'run'}: cannot lock")
    assert os.strerror(errno.ENOSYS) in err


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    cli, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, calls = torch.save, []

    def fills_the_disk(obj, f, *args, **kwargs) -> None:
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint's state.pt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    run = tmp_path / "run"
    code, _, err = cli(*train_args(config_file, run))
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("lmforge train: error: no space left on device")
    assert "while writing checkpoint step-0000008" in err
    (previous,) = ckpt.list_checkpoints(run)
    assert previous.step == 4
    ckpt.verify_checkpoint(previous.path)
    assert not list((run / ckpt.CHECKPOINTS).glob(".tmp-*"))


def test_a_shard_missing_from_the_staging_folder_is_an_error(tmp_path: Path) -> None:
    """On several machines without a shared file system, rank 1's shard lands on its own machine:
    the folder rank 0 would rename into place lacks a file its DCP metadata names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from lmforge.checkpoint.sharded import check_shards_complete

    folder = tmp_path / ckpt.TRAIN_STATE
    with warnings.catch_warnings():  # no process group: DCP saves in this one process
        warnings.simplefilter("ignore")
        dcp.save({"a": torch.ones(4), "b": torch.zeros(3)}, checkpoint_id=folder)
    check_shards_complete(folder)  # every file is here
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.storage_data[MetadataIndex("b")] = _StorageInfo("__1_0.distcp", 0, 100)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(LmforgeError, match=r"__1_0\.distcp .*missing.* shared file system"):
        check_shards_complete(folder)
