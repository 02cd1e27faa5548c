"""Helpers for the training tests: a config file on the tiny corpus, metrics, subprocess runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
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
