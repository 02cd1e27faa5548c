"""A wheel, not the checkout: build it, install it into a fresh venv, and run the demo from there with
a packaged recipe. No network: the wheel installs without its dependencies, which the venv borrows
from the test's own environment through a path (.pth) entry; that entry's own .pth files (the
editable install of the checkout) are never run, and the test checks that lmforge comes from the venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lmforge.model import cpu_kernels
from tests.conftest import DATASETS, REPO

pytestmark = pytest.mark.slow


def run(*args: object, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; its output, or a failure that shows it. Never with PYTHONPATH: a checkout on it
    (or its egg-info) would stand in for the wheel, in pip's view as in Python's."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a clean copy of the project (pip builds in the source tree: the checkout stays clean)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source, cwd=tmp_path)
    (wheel,) = wheels.glob("lmforge-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv holding the wheel; its dependencies come from this environment's site-packages."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    run(*pip, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    return venv


def test_an_installed_wheel_lists_its_recipes_and_runs_the_demo(tmp_path: Path) -> None:
    venv = fresh_venv(tmp_path, build_wheel(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    work = tmp_path / "work"  # not the checkout: nothing here can be imported as lmforge
    work.mkdir()
    where = run(venv / "bin" / "python", "-c", "import lmforge; print(lmforge.__file__)", cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(venv), where
    # the CPU kernels' C source ships in the wheel and builds where a compiler is
    kernels = "from lmforge.model import cpu_kernels as k; print(k.SOURCE.is_file(), k.library() is not None)"
    built = run(
        venv / "bin" / "python",
        "-c",
        kernels,
        cwd=work,
        env={**env, "LMFORGE_KERNEL_CACHE_DIR": str(tmp_path / "kernels")},
    )
    assert built.split() == ["True", str(cpu_kernels._compiler() is not None)], built
    lmforge = venv / "bin" / "lmforge"
    listing = run(lmforge, "recipes", cwd=work, env=env)
    assert "shakespeare-char" in listing and "tasks/sst2" in listing
    run(lmforge, "recipes", "copy", "tasks/sst2", "mine", cwd=work, env=env)
    assert (work / "mine" / "sst2.toml").read_text() == (
        REPO / "src/lmforge/recipes/tasks/sst2.toml"
    ).read_text()
    # The small copy in tests/fixtures is pinned to its own hash in-process only: pass it as a file.
    corpus = "tinyshakespeare" if DATASETS.real else DATASETS.root / "tinyshakespeare" / "input.txt"
    run(lmforge, "prepare", corpus, "--tokenizer", "char", "--out", "data", "-q", cwd=work, env=env)
    toy = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
           "train.max_steps=4", "train.batch_size=4", "train.eval_interval=0", "train.checkpoint_interval=0",
           "log.progress=false", "train.device=cpu", "data.dir=data"]  # fmt: skip
    sets = [arg for item in toy for arg in ("--set", item)]
    printed = run(lmforge, "train", "shakespeare-char", *sets, "--print-config", cwd=work, env=env)
    assert "max_steps = 4" in printed and not (work / "runs").exists()
    run(lmforge, "train", "shakespeare-char", *sets, "--out", "run", cwd=work, env=env)
    sample = run(
        lmforge,
        "sample",
        "run",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "20",
        "--seed",
        "0",
        cwd=work,
        env=env,
    )
    assert sample.strip()
