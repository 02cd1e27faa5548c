"""A small prepared corpus and a tiny config, shared by the training tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.data import prepare

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=32",
    "train.batch_size=8", "train.max_steps=40", "train.eval_interval=10", "train.checkpoint_interval=10",
    "train.eval_batch_size=64", "schedule.warmup_steps=5", "optim.lr=3e-3", "schedule.min_lr=3e-4",
    "train.device=cpu", "log.progress=false",
]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 kB of TinyShakespeare, char-level (falls back to a local text without shared data)."""
    data_dir = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    source = data_dir / "tinyshakespeare" / "input.txt"
    if not source.is_file():
        pytest.skip(f"shared data not found at {data_dir}")
    root = tmp_path_factory.mktemp("chardata")
    (root / "text.txt").write_text(source.read_text()[:60_000])
    prepare(str(root / "text.txt"), root / "data", tokenizer="char", progress=False)
    return root / "data"


@pytest.fixture
def config_file(tmp_path: Path, char_data: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(f'[data]\ndir = "{char_data}"\n')
    return path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(per-step entries, per-eval entries) of a run."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if "loss" in e], [e for e in lines if "val_loss" in e]


def lmforge(*args: object, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs,
    )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()}")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    raise AssertionError(f"step {step} not reached in {timeout} s")
