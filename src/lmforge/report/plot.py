"""`lmforge plot`: the curves of one or more runs, overlaid, from their `metrics.jsonl`.

Four panels: train and val loss, learning rate, grad norm and tokens/s, against the step, the
tokens trained on or the wall time; a run with a preference objective (train.objective = dpo or simpo)
adds its reward margin, preference accuracy and KL to the reference, train and val.
Loss and grad norm are drawn on a log scale, where the
interesting part (late, small changes) would otherwise be a flat line. matplotlib is imported
here only, and only its `Figure`: no pyplot, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.files import file_suffix
from lmforge.report import X_AXES
from lmforge.report.metrics import Metrics, read_metrics
from lmforge.report.runs import run_config, tokens_per_step

X_LABELS = {"step": "step", "tokens": "tokens", "time": "wall time (s)"}
PANELS = (  # (metrics key, title, log scale)
    ("loss", "loss", True),
    ("lr", "learning rate", False),
    ("grad_norm", "grad norm (before clipping)", True),
    ("tokens_per_s", "tokens/s", False),
)
PREFERENCE_PANELS = (  # drawn when a run logs them (train/objective.py)
    ("reward_margin", "reward margin (chosen - rejected)", False),
    ("preference_accuracy", "preference accuracy", False),
    ("kl_to_reference", "KL to the reference (nats)", False),
)


def _figure(**options):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LmforgeError("plot draws with matplotlib: pip install 'lmforge[plot]'") from None
    return Figure(layout="constrained", **options)


def x_values(run_dir: Path, metrics: Metrics, x: str) -> dict[int, float]:
    """Step -> its position on the x axis: the step, the tokens trained on by then, or the wall time."""
    if x == "step":
        return {e["step"]: e["step"] for e in metrics.steps}
    if x == "time":
        return {e["step"]: e["elapsed_s"] for e in metrics.steps}
    per_step = None
    if any("tokens" not in e for e in metrics.steps):  # a log from before `tokens` was written
        per_step = tokens_per_step(run_config(run_dir))
    return {e["step"]: e["tokens"] if per_step is None else e["step"] * per_step for e in metrics.steps}


def plot_runs(run_dirs: list[Path], x: str = "step"):
    """A matplotlib Figure of the runs' curves; each run has one colour, val loss dashed with dots."""
    if x not in X_AXES:
        raise LmforgeError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if len({d.name for d in run_dirs}) < len(run_dirs):
        names = [str(d) for d in run_dirs]  # the legend needs a distinct name per run
    else:
        names = [d.name for d in run_dirs]
    all_metrics = [read_metrics(run_dir) for run_dir in run_dirs]
    preference = any("reward_margin" in e for m in all_metrics for e in m.steps)
    panels = PANELS + PREFERENCE_PANELS if preference else PANELS
    rows = -(-len(panels) // 2)
    fig = _figure(figsize=(11, 3.75 * rows))
    axes = fig.subplots(rows, 2).flatten()
    for ax in axes[len(panels) :]:
        ax.remove()
    for index, (run_dir, name, metrics) in enumerate(zip(run_dirs, names, all_metrics)):
        xs = x_values(run_dir, metrics, x)
        _draw_run(axes, metrics, xs, panels=panels, name=name, colour=f"C{index % 10}")
    for ax, (_, title, log) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel(X_LABELS[x])
        ax.grid(True, alpha=0.3)
        if log:
            _log_scale(ax)
    axes[0].legend(fontsize="small")
    return fig


def _log_scale(ax) -> None:
    """A log y axis labelled with plain numbers (2, 3, 0.6), not powers of ten (3 x 10^0)."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_run(axes, metrics: Metrics, xs: dict[int, float], *, panels: tuple, name: str, colour: str) -> None:
    """Each panel's train curve, and its val points dashed where the evals log `val_<key>` (the loss's
    always, so that the legend pairs every run's train and val)."""
    for ax, (key, _, _) in zip(axes, panels):
        points = [(xs[e["step"]], e[key]) for e in metrics.steps if key in e]
        label = f"{name} train" if key == "loss" else name
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, linewidth=1, label=label)
        evals = [
            (xs[e["step"]], e[f"val_{key}"]) for e in metrics.evals if e["step"] in xs and f"val_{key}" in e
        ]
        if key == "loss" or evals:
            xs_, ys_ = [p[0] for p in evals], [p[1] for p in evals]
            ax.plot(xs_, ys_, "o--", color=colour, markersize=4, label=f"{name} val")


def save_plot(run_dirs: list[Path], out: Path, x: str = "step") -> Path:
    """`lmforge plot`: draw the runs into OUT (PNG, or any format matplotlib writes: .svg, .pdf, ...)."""
    if not out.parent.is_dir():
        raise LmforgeError(f"--out {out}: folder {out.parent} does not exist")
    formats = _figure().canvas.get_supported_filetypes()
    if file_suffix(out).lstrip(".") not in formats:
        raise LmforgeError(f"--out {out}: give a file name ending in one of .{', .'.join(sorted(formats))}")
    plot_runs(run_dirs, x).savefig(out, dpi=80)
    return out
