"""Shared fixtures: the shared data folder, an offline cache, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.cli import main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the network and never share a dataset cache."""
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    if "LMFORGE_DATA_DIR" not in os.environ and DEFAULT_DATA_DIR.is_dir():
        monkeypatch.setenv("LMFORGE_DATA_DIR", str(DEFAULT_DATA_DIR))


@pytest.fixture
def shared_data() -> Path:
    """The shared datasets folder ($LMFORGE_DATA_DIR, else ../shared/data)."""
    path = Path(os.environ.get("LMFORGE_DATA_DIR", DEFAULT_DATA_DIR))
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data not found at {path}; set LMFORGE_DATA_DIR")
    return path


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `lmforge ARGS...` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
