"""What a training run reports as it goes: `metrics.jsonl`, a progress bar and one-line messages.

Only rank 0 of a data-parallel job reports; the other ranks get a `Monitor` that writes nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.inference.loss import LMEval
from lmforge.output import ON_STDOUT
from lmforge.progress import progress_bar
from lmforge.report.metrics import METRICS_FILE
from lmforge.runtime import Peak
from lmforge.train.loggers import MetricWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer update measured."""

    step: int  # updates done, this one included
    loss: float
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # input tokens of the whole global batch
    tokens_seen: int  # input tokens of every update so far, this one and earlier sessions' included
    flops: float  # matmul FLOPs of the update's forward and backward passes, all ranks
    seconds: float
    elapsed_s: float  # since the run began, resumed runs included
    skipped: bool  # a non-finite loss: the update was not applied
    stats: dict[str, float] = field(default_factory=dict)  # the objective's own (train/objective.py)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step and per eval, flushed as written (None: write nothing)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    @staticmethod
    def truncate(path: Path, step: int) -> None:
        """Drop entries after `step` (and a torn last line), so a resumed run continues the log exactly."""
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                break
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


class Monitor:
    """Metrics, progress bar and messages of one run (silent when `run_dir` is None)."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        max_steps: int,
        first_step: int,
        peak: Peak,
        progress: bool = True,
        bar_interval: int = 10,
        writers: list[MetricWriter] = (),
    ) -> None:
        self.metrics = MetricsLog(run_dir / METRICS_FILE if run_dir is not None else None)
        self.writers = list(writers)  # TensorBoard, W&B: each gets every entry of metrics.jsonl
        self.max_steps, self.bar_interval = max_steps, bar_interval
        self.peak = peak  # the whole job's
        self.over_peak_said = False
        shown = progress and run_dir is not None
        self.bar = progress_bar(total=max_steps, initial=first_step, desc="train", unit="step", enabled=shown)
        self.silent = run_dir is None

    def step(self, result: StepResult) -> None:
        tokens_per_s, flops_per_s = result.tokens / result.seconds, result.flops / result.seconds
        entry = {
            "step": result.step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            **self.peak.entry(flops_per_s),  # mfu or matmul_peak_fraction (over_peak above 1), peak_flops
            "elapsed_s": result.elapsed_s,
            "tokens": result.tokens_seen,
            **result.stats,  # a preference objective's rewards, accuracy and KL
        }
        if result.skipped:
            entry["skipped"] = True
        self._write(entry)
        self.bar.update(1)
        over = "over_peak" in entry
        if over and not self.over_peak_said:
            self.over_peak_said = True
            self.say(f"step {result.step}: {self.peak.describe(flops_per_s)} (logged as over_peak)")
        if result.step % self.bar_interval == 0 or result.step == self.max_steps:
            utilisation = "over peak" if over else f"{entry[self.peak.key]:.0%}"
            short = "of_peak" if self.peak.measured else "mfu"
            self.bar.set_postfix(
                {"loss": f"{result.loss:.4f}", "tok_s": f"{tokens_per_s:,.0f}", short: utilisation}
            )

    def eval(self, step: int, result: LMEval, *, privacy: dict | None = None) -> None:
        """An eval's line in metrics.jsonl; with `privacy` (a run with [privacy]) the epsilon spent."""
        entry = {"step": step, "val_loss": result.loss}
        if result.per_token:  # a preference loss has no perplexity
            entry["val_ppl"] = result.ppl
        if result.bpb is not None:
            entry["val_bpb"] = result.bpb
        entry |= {f"val_{name}": value for name, value in result.metrics.items()}
        if privacy is not None:
            entry["epsilon"], entry["delta"] = privacy["epsilon"], privacy["delta"]
        self._write(entry)
        ppl = f", ppl {result.ppl:.2f}" if result.per_token else ""
        bpb = f", {result.bpb:.3f} bpb" if result.bpb else ""
        bpb += "".join(f", {name} {value:.4g}" for name, value in result.metrics.items())
        dp = f", epsilon {privacy['epsilon']:.3f} (delta {privacy['delta']:g})" if privacy is not None else ""
        self.say(f"step {step}: val loss {result.loss:.4f}{ppl}{bpb}{dp}")

    def _write(self, entry: dict) -> None:
        self.metrics.write(entry)
        for writer in self.writers:
            writer.write(entry)

    def say(self, text: str) -> None:
        """A line above the progress bar, on stdout (where a run's messages always were)."""
        if not self.silent:
            logger.info(text, extra=ON_STDOUT)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
