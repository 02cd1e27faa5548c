"""Output heads: a model's logits from the residual stream, and their loss against a batch's targets.

GPT's body (embeddings, blocks) turns tokens into a residual stream (B, T, d_model); the head that
model.head names (`HEADS`) reads it through the final norm at the positions it scores, into logits and,
given targets, a loss (`Head.output`). A head brings its own rules: what its targets hold
(lmforge/targets.py; data/sft.py builds them), whether its loss is a mean per row or per target token
(`per_row_loss`), and its sum over a split (`summed_loss`). A new head is a class here, its batch rule
in data/sft.py and its task.

Each head is itself the layer that scores (an `nn.Linear`), held by GPT under the name its checkpoints
use (`head_attribute`): its weights keep their keys, and Opacus's hooks and peft see a Linear layer.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.targets import IGNORE_INDEX, SPAN_END, SPAN_MATCH, SPAN_START

ROW_MULTIPLE = 128  # `only_targets` pads the rows it keeps to a multiple of this


class HeadOutput(NamedTuple):
    """What a forward returns: the head's logits, and their loss when there are targets."""

    logits: torch.Tensor
    loss: torch.Tensor | None


class Head(nn.Module):
    """A model's output: logits from the residual stream, and their loss. A subclass is also the layer
    that computes the logits (its forward), so that it adds no level to the checkpoint's keys."""

    per_row_loss: ClassVar[bool] = False  # the loss is a mean over rows (examples), not over target tokens

    def output(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        norm: nn.Module,
        only_targets: bool = False,
    ) -> HeadOutput:
        """Logits from the residual stream x (B, T, d_model) read through the model's final `norm`, and
        their mean loss against targets (B, T) if given. `only_targets`: most targets are IGNORE_INDEX,
        and the head may score only the others (it applies `norm` after it picks them)."""
        raise NotImplementedError

    def summed_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The loss of `output`'s logits summed over what a batch scores, and how many it scores: a
        split's mean loss is the sum over its batches divided by the count (`evaluate_lm`)."""
        raise NotImplementedError


class LMHead(Head, nn.Linear):
    """Next-token logits: d_model -> vocab_size without a bias (GPT ties the weight to the input
    embedding by default), soft-capped if configured. Its loss is the mean cross-entropy per target."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.d_model, config.vocab_size, bias=False)
        self.softcap = config.logit_softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) from hidden (..., d_model): the layer, then the soft-cap."""
        logits = self(hidden)  # (..., V)
        if self.softcap is not None:  # bounds the logits smoothly (Gemma 2, modded-nanogpt)
            logits = self.softcap * torch.tanh(logits.float() / self.softcap)
        return logits

    def output(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        norm: nn.Module,
        only_targets: bool = False,
    ) -> HeadOutput:
        """Logits (B, T, V) and their mean cross-entropy. `only_targets` runs the norm and the layer
        only where `targets` is not IGNORE_INDEX and returns those logits as (N, V): fine-tuning batches
        are mostly masked prompt and padding, and this is the most expensive matmul of a small model."""
        kept = None
        if only_targets and targets is not None:
            keep = targets != IGNORE_INDEX
            x, targets = x[keep], targets[keep]  # (N, d_model), (N,)
            # Round the row count up (padding rows are ignored): every new matmul shape costs
            # CPU oneDNN a cached kernel and its memory, and a count that varies per batch
            # would make the process grow by gigabytes.
            kept, pad = x.size(0), -x.size(0) % ROW_MULTIPLE
            x, targets = F.pad(x, (0, 0, 0, pad)), F.pad(targets, (0, pad), value=IGNORE_INDEX)
        logits = self.logits(norm(x))  # (B, T, V), only_targets: (N + pad, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(  # logits as rows (B * T or N + pad, V), targets as (rows,)
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return HeadOutput(logits if kept is None else logits[:kept], loss)

    def summed_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Cross-entropy summed over the target tokens, and their count."""
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
        )
        return loss, int((targets != IGNORE_INDEX).sum())


def head_rows(targets: torch.Tensor, parts: int = 1) -> int:
    """The rows the LM head runs on with `only_targets`: the targets that count, padded to a
    multiple of ROW_MULTIPLE. Split into `parts` equal blocks of rows (each rank's share of a
    data-parallel batch), each block is padded on its own, as each rank pads its own."""
    kept = [int((part != IGNORE_INDEX).sum()) for part in targets.split(targets.size(0) // parts)]
    return sum(k + -k % ROW_MULTIPLE for k in kept)


class SpanHead(Head, nn.Linear):
    """Extractive answers (BERT's SQuAD head): a start and an end score per position, d_model -> 2.
    Its loss (`span_loss`) is a mean per row: every example weighs alike, whatever its length."""

    per_row_loss = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.d_model, 2)

    def output(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        norm: nn.Module,
        only_targets: bool = False,
    ) -> HeadOutput:
        """Scores (B, T, 2) at every position, and `span_loss`. `only_targets` does not apply: every
        position of the prompt is a candidate start or end."""
        scores = self(norm(x))  # (B, T, 2)
        return HeadOutput(scores, None if targets is None else span_loss(scores, targets))

    def summed_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`span_loss` summed over the rows, and their count."""
        return span_loss(logits, targets, reduction="sum"), targets.size(0)


def span_loss(scores: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the start and of the end position over each row's prompt positions, averaged.

    scores: (B, T, 2); targets: (B, T) of SPAN_* flags, IGNORE_INDEX where a row is padded.
    """
    scores = scores.float().masked_fill((targets == IGNORE_INDEX)[..., None], float("-inf"))
    flagged = targets.clamp(min=0)
    starts = (flagged & SPAN_START).bool().int().argmax(dim=1)  # (B,): the first flagged position
    ends = (flagged & SPAN_END).bool().int().argmax(dim=1)
    start_loss = F.cross_entropy(scores[..., 0], starts, reduction=reduction)
    return (start_loss + F.cross_entropy(scores[..., 1], ends, reduction=reduction)) / 2


def word_matches(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the SPAN_MATCH flags of span targets, a model.word_match model's input in training."""
    return (targets.clamp(min=0) & SPAN_MATCH).bool()


HEADS: dict[str, type[Head]] = {"lm": LMHead, "span": SpanHead}  # by model.head


def head_attribute(name: str) -> str:
    """Where GPT holds head `name`, and so its weights' key prefix in checkpoints: `head` for the
    language model's, which every model has, `<name>_head` for a task head (`span_head`)."""
    return "head" if name == "lm" else f"{name}_head"


# The GPT layers that a task adds to the language model it is fine-tuned from: its head, and the word-match
# input of a span head. A run from another checkpoint (train.init_from) keeps its own as built.
TASK_LAYERS = (*(head_attribute(name) for name in HEADS if name != "lm"), "match_embed")
