"""Loss over a whole split, in deterministic non-overlapping windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lmforge.model.heads import LMHead


@dataclass(frozen=True)
class LMEval:
    """The loss of a model over a whole split, and what follows from it."""

    loss: float  # mean cross-entropy per target token, in nats (per_token False: an objective's mean loss)
    tokens: int  # target tokens scored (per_token False: examples scored)
    bytes_per_token: float | None  # UTF-8 bytes per token of the split, when known
    # an objective's own val metrics (a preference objective's rewards and accuracy), logged as val_<name>
    metrics: dict[str, float] = field(default_factory=dict)
    per_token: bool = True  # False: `loss` is not a cross-entropy per token, so it has no perplexity

    @property
    def ppl(self) -> float:
        """Perplexity, exp(loss), capped before it overflows."""
        return math.exp(min(self.loss, 700.0))

    @property
    def bpb(self) -> float | None:
        """Bits per UTF-8 byte: comparable across tokenizers."""
        return self.loss / math.log(2) / self.bytes_per_token if self.bytes_per_token else None

    def as_dict(self) -> dict:
        """The metrics as logged and printed: val_loss, val_ppl, tokens, and bpb when known."""
        result = {"val_loss": self.loss, "tokens": self.tokens}
        if self.per_token:
            result["val_ppl"] = self.ppl
        if self.bpb is not None:
            result["bpb"] = self.bpb
        return result | {f"val_{name}": value for name, value in self.metrics.items()}


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
    bytes_per_token: float | None = None,
    rank: int = 0,
    world: int = 1,
) -> LMEval:
    """Token-weighted mean loss of `model` over every target of `batches` (IGNORE_INDEX targets are skipped);
    with another head, the mean of its `summed_loss` (a span head's: `span_loss` per example).

    With `world` > 1 (a data-parallel run) rank r scores batches r, r + world, ... and the sums
    are all-reduced, so every rank returns the same result for the whole split.
    """
    head = model.output_head
    # A task model (a span head's) reads its targets too: they mark the padding that bidirectional
    # attention must not see, and the word-match input
    reads_targets = not isinstance(head, LMHead)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    seen = scored = 0
    first = None
    try:
        for i, (x, y) in enumerate(batches):
            seen += 1
            first = first or (x, y)
            if i % world != rank:
                continue
            scored += 1
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                logits, _ = model(x, y) if reads_targets else model(x)
            loss_sum, scored_count = head.summed_loss(logits, y)
            total += loss_sum.double()
            count += scored_count
        if world > 1:
            # An FSDP forward is collective: ranks short of a batch run an unscored one so all run as many.
            for _ in range(-(-seen // world) - scored):
                with autocast or contextlib.nullcontext():
                    model(*[t.to(device) for t in (first if reads_targets else first[:1])])
            import torch.distributed as dist

            sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
            dist.all_reduce(sums)
            total, count = sums[0], int(sums[1].item())
    finally:
        model.train(was_training)
    return LMEval(loss=total.item() / count, tokens=count, bytes_per_token=bytes_per_token)
