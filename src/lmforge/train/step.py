"""One optimizer update, and the rule for losses that are not finite."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lmforge.errors import LmforgeError
from lmforge.model.heads import head_rows
from lmforge.targets import IGNORE_INDEX
from lmforge.train import distributed
from lmforge.train.distributed import Distributed
from lmforge.train.objective import LanguageModelLoss, Objective

MAX_CONSECUTIVE_SKIPS = 10  # train.on_nan = "skip": this many non-finite losses in a row stop the run


class Gradients(NamedTuple):
    """What one accumulation of gradients did (over all ranks)."""

    loss: float  # mean loss of the global batch
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # input tokens, padding included
    flops: float  # matmul FLOPs of the forward and backward passes actually run
    stats: dict[str, float]  # the objective's own figures (train/objective.py), means of the global batch


@dataclass(frozen=True)
class StepSettings:
    """How an update runs, besides the objects it runs on (defaults: the config's)."""

    grad_accum_steps: int = 1  # micro-batches whose gradients add up to one update
    grad_clip: float = 1.0  # max global grad norm; 0: measure the norm, never clip
    compile: bool = False  # torch.compile the model
    only_targets: bool = False  # masked (fine-tuning) targets: run the head only where they count
    # the loss is a mean over rows, not target tokens (a span head's): ranks' shares weigh alike.
    # Told (the head's `per_row_loss`), not read off the model: under DDP that is a wrapper.
    loss_per_row: bool = False


class Stepper:
    """One optimizer update: forward and backward over the micro-batches, unscale, clip, step.

    Split in two so the loop can inspect the loss and grad norm before deciding to apply
    the update; benchmarks call it as it is, so they time the real training step. In a
    data-parallel run each rank takes its share of every micro-batch and gradients are
    synchronised on the last one only; the loss and norm returned are those of the global batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        *,
        scaler: torch.amp.GradScaler,
        amp: contextlib.AbstractContextManager,
        device: torch.device,
        settings: StepSettings = StepSettings(),
        dist: Distributed | None = None,
        count_flops: Callable[[int, int, int | None], float] | None = None,
        objective: Objective | None = None,
    ) -> None:
        self.model, self.optimizers, self.scaler, self.amp = model, optimizers, scaler, amp
        # what is minimised (train.objective); default: the model's own loss, as `settings` say
        self.objective = objective or LanguageModelLoss(settings.only_targets, settings.loss_per_row)
        self.device, self.settings = device, settings
        self.forward = torch.compile(model) if settings.compile else model
        self.max_grad_norm = settings.grad_clip or math.inf  # inf: measure the norm, never clip
        self.dist = dist or Distributed()
        # (batch, seq_len, head rows or None) -> FLOPs, e.g. GPT.training_flops; None counts nothing
        # memoised: a batch shape repeats every step, and the count walks every parameter (~0.5 ms at 124M)
        self.count_flops = count_flops and functools.lru_cache(maxsize=4096)(count_flops)

    def gradients(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Gradients:
        """Accumulate the gradients of one update; unscale and clip them."""
        loss_sum = torch.zeros((), device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        tokens, flops = 0, 0.0
        accum, only_targets = self.settings.grad_accum_steps, self.settings.only_targets
        # (x, y), or (x, y, documents) of packed rows (data.pack); all drawn first, to weigh them
        micro_batches = [next(batches) for _ in range(accum)]
        weights = micro_batch_weights([batch[1] for batch in micro_batches], self.objective.per_row_loss)
        for micro, batch in enumerate(micro_batches):
            x, y = batch[0], batch[1]
            tokens += x.numel()  # padded fine-tuning batches vary in length
            if self.count_flops is not None:  # counted on the host batch: no device sync
                rows = head_rows(y, self.dist.world) if only_targets else None
                flops += self.count_flops(x.size(0), x.size(1), rows)
            batch, share = self.dist.shard(batch, per_row=self.objective.per_row_loss)
            share *= weights[micro]
            x, y, *packed = (t.to(self.device, non_blocking=True) for t in batch)
            # packed rows (data.pack) take their documents to every forward; the usual call (and a
            # compiled graph of it) stays as it was
            forward = functools.partial(self.forward, documents=packed[0]) if packed else self.forward
            with self.dist.gradient_sync(self.model, micro == accum - 1):
                with self.amp:
                    loss, stats = self.objective(forward, x, y)
                if share != 1.0:  # this rank's and micro-batch's part of the global mean
                    loss = loss * share
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            for name, value in stats.items():  # per-row means over equal shares: averaged like the loss
                stat_sums[name] = stat_sums.get(name, 0.0) + value
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = distributed.clip_grad_norm(self.model.parameters(), self.max_grad_norm)
        loss = self.dist.mean(loss_sum).item() / accum
        stats = {name: self.dist.mean(value).item() / accum for name, value in stat_sums.items()}
        return Gradients(loss=loss, grad_norm=grad_norm.item(), tokens=tokens, flops=flops, stats=stats)

    def update(self, apply: bool = True) -> None:
        """Step the optimizers (unless told to skip this batch) and clear the gradients."""
        if apply:
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)


def micro_batch_weights(targets: list[torch.Tensor], per_row: bool) -> list[float]:
    """Per micro-batch of one update, the factor that turns its mean loss into its part of the mean
    over the whole accumulated batch: (its scored targets x micro-batches) / (all scored targets).

    Exactly 1 for token windows; padded fine-tuning batches score different numbers of targets, and
    a mean of their means would weigh a target of a short batch more. A loss that is a mean
    `per_row` (a span head's, a preference pair's) weighs the equal micro-batches alike."""
    if per_row or len(targets) == 1:
        return [1.0] * len(targets)
    scored = [int((y != IGNORE_INDEX).sum()) for y in targets]  # host tensors: no device sync
    total = max(sum(scored), 1)
    return [count * len(targets) / total for count in scored]


class NonFiniteGuard:
    """`train.on_nan`: a non-finite loss stops the run, or (`skip`) its batch is skipped,
    until MAX_CONSECUTIVE_SKIPS in a row stop the run anyway.

    Under fp16 the grad scaler handles an infinite grad norm itself (it skips the step and
    lowers the scale), so only the loss is checked then.
    """

    def __init__(self, policy: str, scaler_enabled: bool) -> None:
        self.policy, self.scaler_enabled = policy, scaler_enabled
        self.in_a_row = 0

    def allows_update(self, loss: float, grad_norm: float, *, step: int, last_checkpoint: object) -> bool:
        """True if the update of `step` (1-based) may be applied; raise when the run must stop."""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or self.scaler_enabled):
            self.in_a_row = 0
            return True
        if self.policy == "stop":
            where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
            raise LmforgeError(
                f"loss is {loss} (grad norm {grad_norm}) at step {step}; "
                f'stopped without saving{where} (set train.on_nan = "skip" to skip such batches)'
            )
        self.in_a_row += 1
        if self.in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise LmforgeError(f"{self.in_a_row} non-finite losses in a row up to step {step}; stopping")
        return False
