"""`metrics.jsonl`, the log a training run writes: one JSON object per step and per eval.

Per step: `step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, model FLOP/s over the peak,
`peak_flops` (that peak, FLOP/s of the whole job), `elapsed_s`, `tokens` (input tokens so far). The
ratio is `mfu` against a GPU's dense datasheet peak, `matmul_peak_fraction` (the fraction of measured
matmul peak) against the best matmul measured on the machine, as on a CPU, and `over_peak` instead of
either when above 1: a measurement error, no MFU. Runs from before logged `mfu` against a matmul
peak measured at start-up and no `peak_flops`; older ones no `tokens`. Per eval: `step`, `val_loss`,
`val_ppl`, `val_bpb`. The trainer writes it (`train/monitor.py`); this module reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Metrics:
    """The entries of one run's `metrics.jsonl`, in the order written."""

    steps: list[dict]  # one per optimizer update
    evals: list[dict]  # one per evaluation

    def last_step(self) -> int:
        return max((e["step"] for e in self.steps), default=0)

    def best_val_loss(self) -> float | None:
        return min((e["val_loss"] for e in self.evals), default=None)


def read_metrics(run_dir: Path) -> Metrics:
    """The run's metrics; a torn last line (a run killed mid-write) is left out, anything else that
    is not an entry is a one-line error naming the file and line."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise LmforgeError(f"{run_dir} has no {METRICS_FILE}: not a training run folder, or not started")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    steps, evals = [], []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            step = entry["step"]
            numbers = all(type(v) in (int, float) for k, v in entry.items() if k != "skipped")
            valid = numbers and type(step) is int and ("loss" in entry or "val_loss" in entry)
        except (ValueError, TypeError, KeyError, AttributeError):  # AttributeError: not an object
            valid = False
        if not valid:
            if number == len(lines):
                break
            raise LmforgeError(f"{path}, line {number}: not a metrics entry")
        (steps if "loss" in entry else evals).append(entry)
    return Metrics(steps, evals)
