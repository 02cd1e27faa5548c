"""`lmforge runs` and `lmforge plot`, on real run folders trained once for the module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.report.metrics import read_metrics
from lmforge.report.plot import plot_runs
from lmforge.report.runs import list_runs
from lmforge.staging import write_marker
from tests.conftest import TINY

SHORT = [*TINY, "train.max_steps=20"]


def train(config_file: Path, run: Path, *extra: str) -> None:
    args = ["train", str(config_file), "--out", str(run)]
    for item in [*SHORT, *extra]:
        args += ["--set", item]
    assert main(args) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    """runs/: `done` (20 of 20 steps), `early` (stopped at its first eval by stop_at_val_loss),
    `cut` (as if killed during its final save: its newest checkpoint is step 10)."""
    root = tmp_path_factory.mktemp("runs")
    config_file = root.parent / "tiny.toml"
    config_file.write_text(f'[data]\ndir = "{char_data}"\n')
    train(config_file, root / "done")
    train(config_file, root / "early", "train.stop_at_val_loss=10.0", "optim.lr=1e-3")
    shutil.copytree(root / "done", root / "cut")
    shutil.rmtree(root / "cut" / "checkpoints" / "step-0000020")
    (root / "notes").mkdir()  # not a run: left out
    return root


def test_runs_lists_each_run_with_its_status(runs: Path, cli) -> None:
    code, out, err = cli("runs", runs)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["run", "steps", "best", "val", "tokens", "time", "status"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == ["cut", "done", "early"]
    best = read_metrics(runs / "done").best_val_loss()
    assert rows["done"][1:4] == ["20/20", f"{best:.4f}", "5.1k"]  # 20 steps x 8 x 32 tokens
    assert rows["done"][-1] == "finished" and rows["early"][-1] == "finished"
    assert rows["early"][1] == "10/20"
    assert rows["cut"][-1] == "interrupted"


def test_runs_json_and_sorting(runs: Path, cli) -> None:
    code, out, _ = cli("runs", runs, "--json", "--sort", "step")
    assert code == 0
    listed = json.loads(out)
    assert [r["step"] for r in listed] == [10, 20, 20] and listed[0]["name"] == "early"
    done = next(r for r in listed if r["name"] == "done")
    metrics = read_metrics(runs / "done")
    assert done["tokens"] == metrics.steps[-1]["tokens"] == 20 * 8 * 32
    assert done["elapsed_s"] == metrics.steps[-1]["elapsed_s"] and done["max_steps"] == 20
    by_loss = [r.best_val_loss for r in list_runs(runs, "val_loss")]
    assert by_loss == sorted(by_loss)
    assert [r.name for r in list_runs(runs / "done")] == ["done"]  # a run folder itself


def test_a_run_holding_its_lock_is_running(runs: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)",
            str(runs / "cut" / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert {r.name: r.status for r in list_runs(runs)}["cut"] == "running"
    finally:
        holder.kill()
        holder.wait()
    assert {r.name: r.status for r in list_runs(runs)}["cut"] == "interrupted"


def test_a_run_that_cannot_be_read_is_listed_as_unreadable(runs: Path, cli, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(runs / "done", root / "done")
    killed = root / "killed"  # killed between its marker and its config.toml (train.run.prepare_run_dir)
    killed.mkdir()
    write_marker(killed, "run")
    stale = root / "stale"  # a config that no longer loads
    shutil.copytree(runs / "done", stale)
    (stale / "config.toml").write_text("[train]\nmax_step = 20\n")
    code, out, err = cli("runs", root)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["done"][-1] == "finished"
    assert rows["killed"][1:] == ["-", "-", "-", "-", "unreadable"]
    assert rows["stale"][1:] == ["-", "-", "-", "-", "unreadable"]
    warnings = err.splitlines()
    assert len(warnings) == 2, err
    assert warnings[0].startswith(f"warning: {killed} has no config.toml: ")
    assert warnings[1].startswith(f"warning: {stale / 'config.toml'}: unknown key train.max_step ")
    assert all(line.endswith("; listed as unreadable") for line in warnings)
    code, out, _ = cli("runs", root, "--json", "--sort", "val_loss")
    assert code == 0
    listed = {r["name"]: r for r in json.loads(out)}
    assert listed["done"]["status"] == "finished" and listed["done"]["max_steps"] == 20
    assert listed["killed"] == {
        "name": "killed",
        "path": str(killed),
        "step": None,
        "max_steps": None,
        "best_val_loss": None,
        "tokens": None,
        "elapsed_s": None,
        "status": "unreadable",
    }
    code, _, err = cli("runs", killed)  # the one run asked for: an error
    assert code == 1 and err.startswith(f"lmforge runs: error: {killed} has no config.toml: ")
    assert len(err.splitlines()) == 1


def test_plot_draws_every_curve_from_the_metrics(runs: Path) -> None:
    fig = plot_runs([runs / "done", runs / "early"])
    loss, lr, grad_norm, tokens_per_s = fig.axes
    done, early = read_metrics(runs / "done"), read_metrics(runs / "early")
    train_line, val_line = loss.get_lines()[:2]
    assert list(train_line.get_xdata()) == [e["step"] for e in done.steps]
    assert list(train_line.get_ydata()) == [e["loss"] for e in done.steps]
    assert list(val_line.get_xdata()) == [10, 20]
    assert list(val_line.get_ydata()) == [e["val_loss"] for e in done.evals]
    assert list(loss.get_lines()[3].get_ydata()) == [e["val_loss"] for e in early.evals]
    assert list(lr.get_lines()[0].get_ydata()) == [e["lr"] for e in done.steps]
    assert list(grad_norm.get_lines()[1].get_ydata()) == [e["grad_norm"] for e in early.steps]
    assert list(tokens_per_s.get_lines()[0].get_ydata()) == [e["tokens_per_s"] for e in done.steps]
    assert loss.get_yscale() == "log" and grad_norm.get_yscale() == "log" and lr.get_yscale() == "linear"
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert labels == ["done train", "done val", "early train", "early val"]


@pytest.mark.parametrize("x, key", [("tokens", "tokens"), ("time", "elapsed_s")])
def test_plot_against_tokens_or_wall_time(runs: Path, x: str, key: str) -> None:
    fig = plot_runs([runs / "done"], x=x)
    done = read_metrics(runs / "done")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [e[key] for e in done.steps]
    by_step = {e["step"]: e[key] for e in done.steps}
    assert list(fig.axes[0].get_lines()[1].get_xdata()) == [by_step[10], by_step[20]]


def test_plot_cli_writes_a_png(runs: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    code, stdout, err = cli("plot", runs / "done", runs / "cut", "--out", out)
    assert code == 0, err
    assert stdout == f"plotted 2 runs -> {out}\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_bad_input_is_one_line(runs: Path, cli, tmp_path: Path) -> None:
    cases = [
        (("runs", tmp_path / "missing"), "is not a folder"),
        (("runs", runs / "notes"), "no run folders in"),
        (("plot", runs / "notes", "--out", tmp_path / "a.png"), "has no metrics.jsonl"),
        (("plot", runs / "done", "--out", tmp_path / "a.txt"), "give a file name ending in one of"),
        (("plot", runs / "done", "--out", tmp_path / "no" / "a.png"), "does not exist"),
    ]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 1 and err.startswith(f"lmforge {args[0]}: error: ") and message in err, err
        assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exited:  # a usage error: the verb's usage, then one line
        cli("runs", runs, "--sort", "size")
    assert exited.value.code == 2


def test_a_garbled_metrics_line_is_an_error_but_a_torn_last_line_is_not(
    runs: Path, cli, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs / "done", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')  # killed mid-write
    assert read_metrics(run).last_step() == 20
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    code, _, err = cli("runs", run)
    assert code == 1 and err == f"lmforge runs: error: {run / 'metrics.jsonl'}, line 2: not a metrics entry\n"
