"""TensorBoard and W&B writers: the same numbers as metrics.jsonl, and a resumed run without a step twice."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.train import loggers
from tests.conftest import TINY
from tests.train.conftest import read_metrics

SHORT = ["train.max_steps=15", "log.tensorboard=true", "log.wandb=true"]


def train(cli, config_file: Path, run: Path, *extra: str) -> None:
    args = ["train", config_file, "--out", run]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    code, _, err = cli(*args)
    assert code == 0, err


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(run: Path) -> list[dict]:
    """The history rows of every offline W&B session in the run folder, in the order logged. The
    .wandb file is a LevelDB-style log: a 7-byte header, then records (crc, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block trailer
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def test_resumed_run_continues_tensorboard_and_wandb_without_duplicate_steps(
    cli, config_file: Path, tmp_path: Path, wandb_offline: None
) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(cli, config_file, run, *SHORT)
    # As if killed before its final save: steps 11-15 are logged, the last checkpoint is step 10.
    shutil.rmtree(run / "checkpoints" / "step-0000015")
    first_id = json.loads((run / loggers.WANDB_RUN_FILE).read_text())["id"]
    # W&B names an offline session's folder by the second it starts: a resumed session in the same
    # second as the first gets a "-1" folder, and W&B then sometimes writes none of its history (seen
    # with wandb 0.31 in a loop of two offline sessions; a real resume is never that quick)
    time.sleep(1.05 - time.time() % 1)
    code, _, err = cli("train", "--out", run, "--resume", "--set", "train.max_steps=20")
    assert code == 0, err
    steps, evals = read_metrics(run)
    assert [e["step"] for e in steps] == list(range(1, 21))

    board = tensorboard_scalars(run)
    step_keys = "loss lr grad_norm tokens_per_s matmul_peak_fraction peak_flops elapsed_s tokens".split()
    for key in step_keys:  # on a CPU: the fraction of measured matmul peak, not `mfu`
        assert [s for s, _ in board[f"train/{key}"]] == list(range(1, 21)), key  # no step twice
        assert [v for _, v in board[f"train/{key}"]] == pytest.approx([e[key] for e in steps], rel=1e-6)
    for key in ("loss", "ppl", "bpb"):
        assert board[f"val/{key}"] == [(e["step"], pytest.approx(e[f"val_{key}"], rel=1e-6)) for e in evals]

    history = wandb_history(run)
    sessions = sorted(run.glob("wandb/offline-run-*"))
    assert len(sessions) == 2 and all(p.name.endswith(f"-{first_id}") for p in sessions)  # one W&B run
    train_rows = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == list(range(1, 21))  # 11-15 kept from session one
    for row, entry in zip(train_rows, steps):
        if not 11 <= entry["step"] <= 15:
            assert row["train/loss"] == entry["loss"] and row["train/tokens"] == entry["tokens"]
    assert {row["_step"]: row["val/loss"] for row in history if "val/loss" in row} == {
        10: evals[0]["val_loss"],
        15: pytest.approx(evals[0]["val_loss"], rel=0.1),  # session one's final eval
        20: evals[1]["val_loss"],
    }


def test_tensorboard_text_holds_the_resolved_config(cli, config_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(cli, config_file, tmp_path / "run", "train.max_steps=2", "log.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps = 2" in text and "vocab_size = 59" in text  # resolved from the data


@pytest.mark.parametrize("key", ["tensorboard", "wandb"])
def test_a_missing_package_is_a_one_line_error_naming_key_and_extra(
    cli, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setitem(sys.modules, key, None)  # import fails as if not installed
    code, _, err = cli("train", config_file, "--out", tmp_path / "run", "--set", f"log.{key}=true")
    assert code == 1
    needs = f"log.{key} = true needs the {key} package: pip install 'lmforge[{key}]'"
    assert err == f"lmforge train: error: {needs}\n"
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_wandb_project_must_be_a_valid_name(cli, config_file: Path, tmp_path: Path) -> None:
    code, _, err = cli("train", config_file, "--out", tmp_path / "run", "--set", "log.wandb_project=a/b")
    assert code == 1 and "log.wandb_project" in err and len(err.splitlines()) == 1


def test_scalars_tag_step_and_eval_entries() -> None:
    assert loggers.scalars({"step": 3, "loss": 2.0, "lr": 1e-3, "skipped": True}) == {
        "train/loss": 2.0,
        "train/lr": 1e-3,
    }
    assert loggers.scalars({"step": 3, "val_loss": 1.5, "val_bpb": 2.0}) == {"val/loss": 1.5, "val/bpb": 2.0}
    assert loggers.scalars({"step": 3, "val_loss": 1.5, "epsilon": 2.5, "delta": 1e-5}) == {
        "val/loss": 1.5,
        "privacy/epsilon": 2.5,
        "privacy/delta": 1e-5,
    }


def test_require_packages_passes_when_nothing_is_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config import LogConfig

    monkeypatch.setitem(sys.modules, "wandb", None)
    loggers.require_packages(LogConfig())
    with pytest.raises(LmforgeError, match="lmforge\\[wandb\\]"):
        loggers.require_packages(LogConfig(wandb=True))
