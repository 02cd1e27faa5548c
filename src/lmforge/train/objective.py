"""What a training step minimises (train.objective): the loss the one loop (`step.Stepper`) backpropagates.

`lm` is the model's own next-token cross-entropy. `dpo` and `simpo` score pairs of completions of one
prompt (`data.preference`: rows 2i and 2i + 1 of a batch are pair i's chosen and rejected side) by the
summed log-probability of each completion's tokens:

- DPO (Rafailov et al. 2023) against a frozen reference, the weights the run starts from: with LoRA,
  the same model with its adapters off; else a second model loaded from train.init_from. The
  reference's log-probabilities are computed in each step, without gradients. The implicit reward of
  a completion is beta x (log pi - log ref); the loss is TRL's `DPOTrainer` loss_type sigmoid, hinge or ipo.
- SimPO (Meng et al. 2024), reference-free: the reward is beta x the mean log-probability per token,
  and the loss -log sigmoid(reward margin - gamma), as TRL's `CPOTrainer` with loss_type "simpo".

Each also reports, per step, the mean rewards of either side, their margin, the preference accuracy
(the share of pairs whose chosen side has the higher reward) and (dpo) the KL from the policy to the
reference, summed over each completion's next-token distributions; the loop logs them in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import PreferenceConfig
from lmforge.inference.loss import LMEval
from lmforge.targets import IGNORE_INDEX

# (x, y) -> the head's logits at the positions whose target is not IGNORE_INDEX, as (N, V) in row order
TargetLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ObjectiveLoss(NamedTuple):
    """One micro-batch's loss, and what the objective reports of it besides (detached scalars)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


class Objective(Protocol):
    """A micro-batch's loss given the model's forward; `per_row_loss` as `StepSettings` says."""

    per_row_loss: bool

    def __call__(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveLoss: ...


@dataclass(frozen=True)
class LanguageModelLoss:
    """train.objective = "lm": the head's own loss (next-token cross-entropy, or a task head's)."""

    only_targets: bool = False  # masked (fine-tuning) targets: run the head only where they count
    per_row_loss: bool = False  # the head's loss is a mean over rows (a span head's)

    def __call__(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveLoss:
        _, loss = forward(x, y, only_targets=self.only_targets)
        return ObjectiveLoss(loss, {})


class SequenceLogps(NamedTuple):
    """Per row of a batch: the summed log-probability of its target tokens, and how many there are."""

    logps: torch.Tensor  # (R,)
    tokens: torch.Tensor  # (R,)


def target_rows(y: torch.Tensor) -> torch.Tensor:
    """(N,): the row of each target that counts, in the order `only_targets` returns their logits."""
    return (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]


def sequence_logps(logits: torch.Tensor, y: torch.Tensor) -> SequenceLogps:
    """Each row's summed log-probability of its targets, from `logits` (N, V) at those targets."""
    keep = y != IGNORE_INDEX
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, y[keep][:, None]).squeeze(1)  # (N,)
    rows = target_rows(y)
    logps = torch.zeros(y.size(0), device=y.device).index_add(0, rows, token_logps)
    return SequenceLogps(logps, keep.sum(dim=1).float())


def sequence_kl(logits: torch.Tensor, ref_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R,): KL(policy || reference) of the next-token distributions, summed over each row's targets."""
    logp, ref_logp = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1)  # (N,)
    return torch.zeros(y.size(0), device=y.device).index_add(0, target_rows(y), per_token)


def dpo_losses(
    policy: SequenceLogps, reference: SequenceLogps, *, beta: float, loss_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: DPO's loss, and the chosen and rejected rewards beta x (log pi - log ref) (detached).
    Rows alternate chosen, rejected; the formulas are TRL DPOTrainer's (`_compute_loss`)."""
    chosen_ratio = policy.logps[0::2] - reference.logps[0::2]
    rejected_ratio = policy.logps[1::2] - reference.logps[1::2]
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif (
        loss_type == "ipo"
    ):  # per-token log-ratios, so that the target 1 / (2 beta) does not scale with length
        per_token = chosen_ratio / policy.tokens[0::2].clamp(min=1) - rejected_ratio / policy.tokens[
            1::2
        ].clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_losses(
    policy: SequenceLogps, *, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: SimPO's loss, and the chosen and rejected rewards beta x mean token log-prob (detached)."""
    mean_logps = policy.logps / policy.tokens.clamp(min=1)
    chosen, rejected = beta * mean_logps[0::2], beta * mean_logps[1::2]
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


@dataclass(frozen=True)
class PreferenceLoss:
    """train.objective = "dpo" or "simpo" on a batch of pairs (see the module docstring)."""

    config: PreferenceConfig
    reference: TargetLogits | None  # dpo: the frozen reference; simpo: None
    per_row_loss: bool = True  # a mean over pairs: every rank's equal share of pairs weighs alike

    def __call__(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveLoss:
        logits, _ = forward(x, y, only_targets=True)  # (N, V) at the completions' tokens
        policy = sequence_logps(logits, y)
        c = self.config
        if self.reference is None:
            losses, chosen, rejected = simpo_losses(policy, beta=c.beta, gamma=c.simpo_gamma)
            kl = None
        else:
            with torch.no_grad():
                ref_logits = self.reference(x, y)
            reference = sequence_logps(ref_logits, y)
            losses, chosen, rejected = dpo_losses(policy, reference, beta=c.beta, loss_type=c.loss_type)
            kl = sequence_kl(logits.detach(), ref_logits, y).mean()
        stats = {
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "preference_accuracy": (chosen > rejected).float().mean(),
            "logp_chosen": policy.logps[0::2].detach().mean(),
            "logp_rejected": policy.logps[1::2].detach().mean(),
        }
        if kl is not None:
            stats["kl_to_reference"] = kl
        return ObjectiveLoss(losses.mean(), stats)


def frozen_reference(model: nn.Module) -> TargetLogits:
    """A separate frozen model (full fine-tuning's reference), in eval mode, scoring the targets."""
    model.eval().requires_grad_(False)
    return lambda x, y: model(x, y, only_targets=True).logits


def adapters_off(model: nn.Module) -> TargetLogits:
    """A LoRA model with its adapters disabled (its frozen base: the reference), in eval mode."""

    def logits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return model(x, y, only_targets=True).logits
        finally:
            model.train(was_training)

    return logits


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module,
    objective: PreferenceLoss,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> LMEval:
    """The mean preference loss over every pair of `batches`, with the mean of each statistic.

    Every rank scores every pair (val sets of pairs are small), so that all ranks agree without a
    collective and an FSDP forward runs as often on each."""
    was_training = model.training
    model.eval()
    total, pairs, sums = 0.0, 0, {}
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                result = objective(model, x, y)
            n = x.size(0) // 2
            total += result.loss.item() * n
            pairs += n
            for name, value in result.stats.items():
                sums[name] = sums.get(name, 0.0) + value.item() * n
    finally:
        model.train(was_training)
    metrics = {name: value / pairs for name, value in sums.items()}
    return LMEval(loss=total / pairs, tokens=pairs, bytes_per_token=None, metrics=metrics, per_token=False)
