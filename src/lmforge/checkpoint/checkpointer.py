"""The `Checkpointer`: every checkpoint decision of a training run, in one place.

Where a run resumes from, what a resume restores (and in which order, around parallelisation),
when to save (periodically, on a new best val loss, at the end, on a stop signal), and which
checkpoints to keep. The training loop only tells it what happened; torchtitan's
`CheckpointManager` plays the same part.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmforge.checkpoint.folder import (
    CHECKPOINTS,
    has_sharded_state,
    list_checkpoints,
    load_state,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.checkpoint.sharded import (
    TRAIN_STATE,
    ShardedModel,
    full_optimizer_state,
    is_main_process,
    load_shards,
    set_full_optimizer_state,
)
from lmforge.config import Config
from lmforge.data.chat_template import ChatTemplate
from lmforge.errors import LmforgeError
from lmforge.runtime import rng_state, set_rng_state
from lmforge.staging import check_out

logger = logging.getLogger(__name__)
RESUME_HINT = "pass --resume to continue that run or --overwrite to start over"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """The objects a checkpoint saves and a resume restores, besides the config and tokenizer."""

    module: nn.Module  # the model itself: model.safetensors, parameter names
    wrapped: nn.Module  # what runs forward/backward (DDP/FSDP2 around `module`): its DCP shards
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    batches: Stateful  # the data sampler
    progress: Any  # a dataclass of loop counters (step, tokens, elapsed, best val loss, ...)
    privacy: Any = None  # a run with [privacy]: its accountant (Stateful, plus report() for meta.json)


class Checkpointer:
    """Owns the checkpoints of one run folder: resume, restore, save policy, pruning.

    `sharded` (a data-parallel run): every rank calls every method; the optimizer state goes
    into DCP shards, the rest is written by rank 0.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        *,
        tokenizer_file: Path,
        sharded: bool = False,
        clock: Callable[[], float] | None = None,
        chat_template: ChatTemplate | None = None,
        end_ids: Sequence[int] = (),
    ) -> None:
        self.run_dir, self.config, self.tokenizer_file = run_dir, config, tokenizer_file
        self.chat_template = chat_template  # saved with every checkpoint
        self.end_ids = tuple(end_ids)  # likewise: the ids that end a completion, if not <|endoftext|>
        self.sharded = sharded
        self.clock = clock  # the run's elapsed seconds, saved with each checkpoint
        self.state: TrainingState | None = None
        self.resume_from: Path | None = None
        self.latest: Path | None = None  # the newest checkpoint of this run, once there is one
        self.last_saved_step = -1
        self._saved: dict[str, Any] | None = None
        self._full_optimizer_states: list[dict] | None = None  # one per optimizer

    @staticmethod
    def find_resume_point(
        run_dir: Path, *, resume: bool, overwrite: bool, inputs: Iterable[Path] = ()
    ) -> Path | None:
        """The checkpoint to resume from (verified), or None for a new run in a folder that it may
        replace (`staging.check_out`: a run folder lmforge wrote, none of the run's `inputs`)."""
        if resume and overwrite:
            raise LmforgeError("--resume and --overwrite exclude each other")
        if resume:
            return newest_intact_checkpoint(run_dir)
        check_out(run_dir, "run", overwrite, inputs=inputs, hint=RESUME_HINT)
        return None

    def restore_weights(
        self,
        path: Path,
        module: nn.Module,
        *,
        build_optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]],
    ) -> None:
        """First half of a resume, before parallelisation: the full weights into the plain model.

        A single-process checkpoint resumed by several processes also has its optimizer moments
        named by parameter here (from optimizers built on the plain model), so that `restore` can
        shard them onto the parallelized one.
        """
        self.resume_from = self.latest = path
        load_weights(path, module)
        self._saved = load_state(path)
        has_optimizers = "optimizers" in self._saved
        if not has_optimizers and not has_sharded_state(path):
            raise LmforgeError(
                f"{path}: has no training state to resume (an imported checkpoint?); "
                f'start a new run with train.init_from = "{path}"'
            )
        if has_optimizers and self.sharded:
            plain = build_optimizers(module)
            _load_optimizer_states(plain, self._saved["optimizers"])
            self._full_optimizer_states = [full_optimizer_state(module, [optimizer]) for optimizer in plain]

    def restore(self, state: TrainingState) -> None:
        """Attach the run's objects; on a resume, give them their saved state (second half)."""
        self.state = state
        if self.resume_from is None:
            return
        saved, path = self._saved, self.resume_from
        if has_sharded_state(path):
            load_shards(path / TRAIN_STATE, state.wrapped, state.optimizers)
        elif self._full_optimizer_states is not None:
            _shard_optimizer_states(state, self._full_optimizer_states, saved["optimizers"])
        else:
            _load_optimizer_states(state.optimizers, saved["optimizers"])
        _restore_privacy(state.privacy, saved.get("privacy"), path)
        state.scaler.load_state_dict(saved["scaler"])
        state.batches.load_state_dict(saved["batches"])
        set_rng_state(saved["rng"])
        for name, value in saved["loop"].items():
            setattr(state.progress, name, value)
        self._saved = self._full_optimizer_states = None

    def after_step(self, step: int, val_loss: float | None, *, last: bool) -> None:
        """Save when the step is periodic, the val loss a new best, or the run ends here (`last`)."""
        progress = self.state.progress
        best = progress.best_val_loss
        improved = val_loss is not None and (best is None or val_loss < best)
        if improved:
            progress.best_val_loss = val_loss
        interval = self.config.train.checkpoint_interval
        if (interval and step % interval == 0) or improved or last:
            self.save(step, val_loss)

    def on_stop(self, step: int) -> Path:
        """A stop signal: make sure this step is saved; return the checkpoint to resume from."""
        if self.last_saved_step != step:
            self.save(step, None)
        return self.latest

    def finish(self, step: int, val_loss: float) -> Path:
        """The end of the run: the checkpoint to report (saved now if the run has none yet)."""
        if self.last_saved_step != step and self.latest is None:
            self.save(step, val_loss)
        return self.latest

    def save(self, step: int, val_loss: float | None) -> Path:
        """Write checkpoint `step` now, then prune the old ones."""
        state = self.state
        if self.clock is not None:
            state.progress.elapsed_s = self.clock()
        training_state = {
            # sharded: the optimizer state goes into the checkpoint's DCP folder instead
            **({} if self.sharded else {"optimizers": [o.state_dict() for o in state.optimizers]}),
            "scaler": state.scaler.state_dict(),
            "batches": state.batches.state_dict(),
            "rng": rng_state(),
            "loop": dataclasses.asdict(state.progress),
            **({} if state.privacy is None else {"privacy": state.privacy.state_dict()}),
        }
        extra_meta = None if state.privacy is None else {"privacy": state.privacy.report()}
        sharded = ShardedModel(state.wrapped, state.module, state.optimizers) if self.sharded else None
        path = save_checkpoint(
            self.run_dir,
            step,
            state.module,
            state=training_state,
            config=self.config,
            tokenizer_file=self.tokenizer_file,
            val_loss=val_loss,
            sharded=sharded,
            extra_meta=extra_meta,
            chat_template=self.chat_template,
            end_ids=self.end_ids,
        )
        if sharded is None or is_main_process():
            prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints, newest_step=step)
        self.latest, self.last_saved_step = path, step
        return path


def newest_intact_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of `run_dir` that verifies; each newer one that does not is named in a
    warning (by rank 0). An error if none verifies."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise LmforgeError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
    problems: list[str] = []
    for candidate in reversed(checkpoints):
        try:
            verify_checkpoint(candidate.path)
        except LmforgeError as exc:
            problems.append(str(exc))
            continue
        if is_main_process():
            for problem in problems:
                logger.warning(f"{problem}; resuming from {candidate.path} instead")
        return candidate.path
    older = f"; the {len(problems) - 1} older checkpoint(s) do not verify either" if len(problems) > 1 else ""
    raise LmforgeError(f"{problems[0]}{older}")


def _restore_privacy(privacy: Any, saved: dict | None, path: Path) -> None:
    """The accountant's history, so that epsilon counts the steps before the resume; a run cannot
    gain or lose [privacy] midway (epsilon would then describe only part of its training)."""
    if (privacy is None) != (saved is None):
        was, now = ("with", "without") if saved is not None else ("without", "with")
        raise LmforgeError(f"{path}: trained {was} [privacy], cannot be resumed {now} it")
    if privacy is not None:
        privacy.load_state_dict(saved)


def _shard_optimizer_states(state: TrainingState, full_states: list[dict], saved: list[dict]) -> None:
    """A single-process checkpoint's optimizer states onto the parallelized model, optimizer by optimizer.

    An optimizer without per-parameter state (SGD without momentum) has nothing to shard, and DCP's
    full-state loader fails on one (it finds no tensor to tell the device by): it loads as it was saved.
    """
    for optimizer, full, saved_state in zip(state.optimizers, full_states, saved, strict=True):
        if full["state"]:
            set_full_optimizer_state(state.wrapped, [optimizer], full)
        else:
            optimizer.load_state_dict(saved_state)


def _load_optimizer_states(optimizers: list[torch.optim.Optimizer], states: list[dict]) -> None:
    for optimizer, optimizer_state in zip(optimizers, states, strict=True):
        optimizer.load_state_dict(optimizer_state)
