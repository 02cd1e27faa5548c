"""`lmforge runs`: one line per run folder, from its files alone.

The status of a run: `running` while a process holds its lock (`staging.is_locked`), `finished`
when its newest checkpoint is at train.max_steps or at an eval that reached train.stop_at_val_loss,
and `interrupted` otherwise (stopped by a signal, killed, or failed). In a listing of several runs,
one whose files cannot be read (no config.toml yet, a config that no longer loads, a garbled log) is
`unreadable`, with a warning that says why, so that it does not hide the others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.config import Config, load_config
from lmforge.errors import LmforgeError
from lmforge.report import SORT_KEYS
from lmforge.report.metrics import METRICS_FILE, Metrics, read_metrics
from lmforge.run_folder import list_checkpoints
from lmforge.staging import folder_kind, is_locked

logger = logging.getLogger(__name__)
UNREADABLE = "unreadable"  # the status of a run whose files cannot be read
SORT_FIELDS = dict(zip(SORT_KEYS, ("name", "step", "best_val_loss", "elapsed_s")))  # --sort -> field


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: str
    # each of these is None for an unreadable run
    step: int | None  # the last step logged
    max_steps: int | None  # train.max_steps of its config
    best_val_loss: float | None  # the lowest val loss logged (None too before the first eval)
    tokens: int | None  # input tokens trained on
    elapsed_s: float | None  # wall time of the run, every session included
    status: str  # finished / interrupted / running / unreadable


def summarize_run(run_dir: Path) -> RunSummary:
    """The summary of one run folder."""
    config = run_config(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else Metrics([], [])
    last = metrics.steps[-1] if metrics.steps else {}
    step = metrics.last_step()
    return RunSummary(
        name=run_dir.name,
        path=str(run_dir),
        step=step,
        max_steps=config.train.max_steps,
        best_val_loss=metrics.best_val_loss(),
        tokens=int(last.get("tokens", step * tokens_per_step(config))),
        elapsed_s=float(last.get("elapsed_s", 0.0)),
        status=run_status(run_dir, config, metrics),
    )


def tokens_per_step(config: Config) -> int:
    """Input tokens of one update: for logs written before `tokens` was (padding counted, for SFT)."""
    t = config.train
    return t.batch_size * t.grad_accum_steps * config.model.block_size


def run_status(run_dir: Path, config: Config, metrics: Metrics) -> str:
    if is_locked(run_dir):
        return "running"
    checkpoints = list_checkpoints(run_dir)
    newest = checkpoints[-1].step if checkpoints else None
    if newest is not None and newest >= config.train.max_steps:
        return "finished"
    target = config.train.stop_at_val_loss
    if target is not None and any(e["step"] == newest and e["val_loss"] <= target for e in metrics.evals):
        return "finished"
    return "interrupted"


def run_config(run_dir: Path) -> Config:
    path = run_dir / "config.toml"
    if not path.is_file():
        raise LmforgeError(f"{run_dir} has no config.toml: not a training run folder, or one killed early")
    return load_config(path)


def find_runs(folder: Path) -> list[Path]:
    """FOLDER itself if it is a run folder, else the run folders in it (one level down)."""
    if not folder.is_dir():
        raise LmforgeError(f"{folder} is not a folder")
    if folder_kind(folder) == "run":
        return [folder]
    runs = [p for p in sorted(folder.iterdir()) if p.is_dir() and folder_kind(p) == "run"]
    if not runs:
        raise LmforgeError(f"no run folders in {folder} (folders that `lmforge train` wrote)")
    return runs


def list_runs(folder: Path, sort: str = "name") -> list[RunSummary]:
    """The runs in FOLDER sorted by name, steps done, best val loss (runs without one last) or wall time."""
    if sort not in SORT_KEYS:
        raise LmforgeError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    runs = find_runs(folder)
    if runs == [folder]:  # the one run asked for: what keeps it from being read is an error
        summaries = [summarize_run(folder)]
    else:
        summaries = [summarize_or_flag(run_dir) for run_dir in runs]
    field = SORT_FIELDS[sort]
    # what is unknown (an unreadable run's figures, a run's val loss before its first eval) sorts last
    return sorted(summaries, key=lambda r: (getattr(r, field) is None, getattr(r, field) or 0))


def summarize_or_flag(run_dir: Path) -> RunSummary:
    """The summary of one of several runs: an `unreadable` one, and a warning, where it cannot be read."""
    try:
        return summarize_run(run_dir)
    except LmforgeError as exc:
        logger.warning(f"{exc}; listed as {UNREADABLE}")
        unknown = dict.fromkeys(("step", "max_steps", "best_val_loss", "tokens", "elapsed_s"))
        return RunSummary(name=run_dir.name, path=str(run_dir), **unknown, status=UNREADABLE)


def runs_report(folder: Path, sort: str = "name", as_json: bool = False) -> str:
    """`lmforge runs`: a table, or a JSON list of the summaries."""
    runs = list_runs(folder, sort)
    if as_json:
        return json.dumps([asdict(r) for r in runs], indent=1)
    return format_table(runs)


def format_table(runs: list[RunSummary]) -> str:
    rows = [("run", "steps", "best val", "tokens", "time", "status")]
    for r in runs:
        if r.status == UNREADABLE:
            rows.append((r.name, "-", "-", "-", "-", r.status))
            continue
        best = "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}"
        steps = f"{r.step:,}/{r.max_steps:,}"
        rows.append((r.name, steps, best, human_count(r.tokens), human_time(r.elapsed_s), r.status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 2, 3, 4}  # numbers are right-aligned
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def human_count(n: int) -> str:
    """12,345,678 -> 12.3M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def human_time(seconds: float) -> str:
    """3723 -> 1h 02m; 75 -> 1m 15s; 4.2 -> 4.2s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
