"""The training loop: data → forward → loss → backward → optimizer update, with exact resume.

One loop serves pretraining and fine-tuning, in one process or data-parallel under torchrun
(`parallel.strategy`; see `distributed.py`). `run.py` builds everything the loop uses; the
`Checkpointer` decides what is saved and when; a resumed run continues bit-identically, since
a checkpoint holds weights, optimizer moments, grad scaler, the data sampler's generator,
every RNG state and the loop counters.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from lmforge.config import Config, TrainConfig, load_config
from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.inference.loss import LMEval
from lmforge.output import ON_STDOUT
from lmforge.recipes import config_path
from lmforge.runtime import Peak, format_flops
from lmforge.staging import locked
from lmforge.train import distributed, loggers
from lmforge.train.monitor import Monitor, StepResult
from lmforge.train.optim import set_lr_factor
from lmforge.train.run import Run, build_run, finished
from lmforge.train.schedule import lr_factor
from lmforge.train.step import NonFiniteGuard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    elapsed_s: float
    tokens_per_s: float
    flops_per_s: float  # model FLOPs of every update over the elapsed time
    peak: Peak  # the whole job's: the denominator of MFU
    final_eval: LMEval | None
    checkpoint: Path
    epsilon: float | None = None  # a run with [privacy]: the epsilon spent (at privacy.delta)

    def describe(self) -> str:
        """The one line `lmforge train` prints at the end."""
        result = self.final_eval
        bpb = f", {result.bpb:.3f} bpb" if result and result.bpb else ""
        if result.per_token:
            details = f"ppl {result.ppl:.2f}{bpb}"
        else:  # an objective's own metrics (a preference loss has no perplexity)
            details = ", ".join(f"{name} {value:.4g}" for name, value in result.metrics.items())
        return (
            f"done: {self.steps} steps in {self.elapsed_s:.1f} s, {self.tokens_per_s:,.0f} tokens/s, "
            f"{self.peak.describe(self.flops_per_s)}; "
            f"val loss {result.loss:.4f} ({details}); "
            f"checkpoint {self.checkpoint}{'' if self.epsilon is None else f'; epsilon {self.epsilon:.3f}'}"
        )


def command_config(
    config_file: str | None, overrides: list[str], *, out: str | None, resume: bool
) -> tuple[Config, Path | None]:
    """The config of `lmforge train`/`finetune` (and its file): CONFIG (a file, else a packaged recipe
    of that name), or the run's own with --resume, or the defaults with the overrides."""
    if config_file is not None:
        path: Path | None = config_path(config_file)
    elif out:
        path = Path(out) / "config.toml" if resume else None
    else:
        raise LmforgeError(
            "give a CONFIG file or recipe, or --out RUN_DIR (with --set overrides or --resume)"
        )
    origin = config_file if config_file is not None else str(path or "--set")
    return load_config(path, overrides, origin=origin), path


def train_command(
    config_file: str | None, overrides: list[str], *, out: str | None, resume: bool, overwrite: bool
) -> TrainSummary:
    """`lmforge train` and `finetune`: the config as `command_config` finds it; the run folder is
    --out, or runs/CONFIG_NAME."""
    config, path = command_config(config_file, overrides, out=out, resume=resume)
    run_dir = Path(out) if out else Path("runs") / path.stem
    return train(config, run_dir, resume=resume, overwrite=overwrite, config_file=path)


def train(
    config: Config,
    run_dir: Path | str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    config_file: Path | None = None,
) -> TrainSummary:
    """Train per `config` (read from `config_file`, if any) into `run_dir`; see the module
    docstring for what is saved.

    Under torchrun with parallel.strategy ddp or fsdp every process calls this; rank 0 alone
    writes the run folder (but for its share of a checkpoint's DCP shards), and holds its lock.
    """
    run_dir, parallel = Path(run_dir), config.parallel
    loggers.require_packages(config.log)
    group = distributed.process_group(parallel.strategy, config.train.device, parallel.timeout_s)
    with group as (dist, device), locked(run_dir, enabled=dist.is_main):  # no other process writes run_dir
        run = build_run(
            config,
            run_dir,
            resume=resume,
            overwrite=overwrite,
            dist=dist,
            device=device,
            config_file=config_file,
        )
        return train_loop(run)


def train_loop(run: Run) -> TrainSummary:
    """Step, log, evaluate, checkpoint; stop at max_steps, at a target val loss, or on a signal."""
    t, progress, checkpointer = run.config.train, run.progress, run.checkpointer
    # resumed at its end (train.max_steps, or train.stop_at_val_loss reached): its folder stays as it was
    if finished(run.config, progress.step, progress.best_val_loss):
        return summarize_finished(run)
    guard = NonFiniteGuard(t.on_nan, run.state.scaler.is_enabled())
    last_eval = None
    run.state.wrapped.train()
    with open_monitor(run) as monitor, StopSignals() as stop:
        monitor.say(
            f"training on {run.device} in {t.dtype}, {run.state.module.num_params():,} parameters; "
            f"{run.peak.name} against {format_flops(run.peak.flops)} ({run.peak.source})"
        )
        if summary := getattr(run.data, "summary", None):  # fine-tuning data: what was read, in which format
            monitor.say(summary)
        while progress.step < t.max_steps:
            monitor.step(train_step(run, guard))
            val_loss = None
            if evaluation_due(t, progress.step):
                last_eval = run.evaluate()
                val_loss = last_eval.loss
                monitor.eval(progress.step, last_eval, privacy=run.privacy_report())
            reached = target_reached(t, val_loss)
            checkpointer.after_step(progress.step, val_loss, last=reached or progress.step == t.max_steps)
            if reached:
                monitor.say(
                    f"step {progress.step}: val loss {val_loss:.4f} <= train.stop_at_val_loss; stopping"
                )
                break
            if run.dist.any(stop.received is not None):  # all ranks stop at the same step
                saved = checkpointer.on_stop(progress.step)
                raise TrainingInterrupted(
                    stop.received or signal.SIGTERM, progress.step, saved, run_dir=run.run_dir
                )
    return summarize(run, last_eval, checkpointer.finish(progress.step, last_eval.loss))


def summarize_finished(run: Run) -> TrainSummary:
    """A resume with nothing to train: say so, and sum up the checkpoint it resumed from (evaluated
    again, since the log's last eval may be of another step); writes nothing."""
    t, progress = run.config.train, run.progress
    if progress.step >= t.max_steps:
        why = (
            f"the run has done {progress.step} steps (train.max_steps = {t.max_steps}); "
            "train.max_steps counts every step of the run: raise it to train on"
        )
    else:
        why = (
            f"the run reached val loss {progress.best_val_loss:.4f} <= train.stop_at_val_loss "
            f"({t.stop_at_val_loss:g}) at step {progress.step}: lower or unset it to train on"
        )
    if run.dist.is_main:
        logger.info(f"nothing to do: {why}", extra=ON_STDOUT)
    return summarize(run, run.evaluate(), run.checkpointer.latest)


def evaluation_due(t: TrainConfig, step: int) -> bool:
    return bool(t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps


def target_reached(t: TrainConfig, val_loss: float | None) -> bool:
    """train.stop_at_val_loss: end the run at the first eval at or below it."""
    return val_loss is not None and t.stop_at_val_loss is not None and val_loss <= t.stop_at_val_loss


def train_step(run: Run, guard: NonFiniteGuard) -> StepResult:
    """One optimizer update at the scheduled learning rate (skipped if `guard` says so)."""
    config, progress = run.config, run.progress
    start = time.perf_counter()
    factor = lr_factor(
        progress.step, config.schedule, max_steps=config.train.max_steps, peak_lr=config.optim.lr
    )
    set_lr_factor(run.state.optimizers, factor)
    done = run.stepper.gradients(run.state.batches)
    apply = guard.allows_update(
        done.loss, done.grad_norm, step=progress.step + 1, last_checkpoint=run.checkpointer.latest
    )
    run.stepper.update(apply=apply)
    progress.step += 1
    progress.tokens_seen += done.tokens
    progress.flops_done += done.flops
    if not apply:
        progress.skipped_steps += 1
    seconds = time.perf_counter() - start
    lr = config.optim.lr * factor
    return StepResult(
        step=progress.step,
        loss=done.loss,
        grad_norm=done.grad_norm,
        lr=lr,
        tokens=done.tokens,
        tokens_seen=progress.tokens_seen,
        flops=done.flops,
        seconds=seconds,
        elapsed_s=run.elapsed(),
        skipped=not apply,
        stats=done.stats,
    )


def open_monitor(run: Run) -> Monitor:
    """Rank 0 reports into the run folder (and to TensorBoard / W&B if asked); the other ranks stay silent."""
    main = run.dist.is_main
    return Monitor(
        run.run_dir if main else None,
        max_steps=run.config.train.max_steps,
        first_step=run.progress.step,
        peak=run.peak,
        progress=run.config.log.progress,
        bar_interval=run.config.log.interval,
        writers=loggers.open_writers(run.config, run.run_dir, run.progress.step) if main else [],
    )


def summarize(run: Run, final_eval: LMEval | None, checkpoint: Path) -> TrainSummary:
    elapsed = run.elapsed()
    tokens_per_s = run.progress.tokens_seen / max(elapsed, 1e-9)
    return TrainSummary(
        steps=run.progress.step,
        elapsed_s=elapsed,
        tokens_per_s=tokens_per_s,
        flops_per_s=run.progress.flops_done / max(elapsed, 1e-9),
        peak=run.peak,
        final_eval=final_eval,
        checkpoint=checkpoint,
        epsilon=None if (report := run.privacy_report()) is None else report["epsilon"],
    )


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
