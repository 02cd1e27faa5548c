"""Differentially private training (DP-SGD) through Opacus: `[privacy]` in the config.

What makes a step private, and where it happens:

- per-sample gradients: Opacus's `GradSampleModule` hooks every module that holds parameters
  (Linear, Embedding, LayerNorm, RMSNorm, the QK-norm's `HeadNorm`, the Linear `LMHead`) and computes
  each window's gradient from the module's input and output gradient; attention (SDPA) and RoPE have no
  parameters; a tied embedding and head add their two contributions; learned positions are
  looked up per sequence (`GPT.per_sample_positions`) so that their rows are per sample too;
- sampling: `PoissonWindows` (each disjoint window of the train split in a batch with probability
  q = train.batch_size / windows);
- clipping and noise: Opacus's `DPOptimizer` clips each window's gradient, over all parameters
  together, to `max_grad_norm`, sums, adds N(0, (noise_multiplier x max_grad_norm)²) per coordinate
  and divides by the expected batch size; the run's optimizers (AdamW, SGD, or Muon with AdamW)
  then step on that gradient. Whatever they do with it, and `optim.grad_clip` applied to it, is
  post-processing of a private quantity, so it keeps the guarantee;
- accounting: an Opacus accountant (RDP or PRV) records (sigma, q) at every step; its history is
  saved in each checkpoint, so a resumed run reports the epsilon of an uninterrupted one.

The noise comes from torch's default generator, whose state every checkpoint saves: runs are
reproducible and resume exactly, but the noise is not cryptographically secure (Opacus's
`secure_mode` is not used).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.rms_norm import compute_rms_norm_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from torch import nn
from torch.nn import functional as F

from lmforge.config import Config, PrivacyConfig
from lmforge.data.loader import PoissonWindows, PreparedData
from lmforge.errors import LmforgeError
from lmforge.model.gpt import HeadNorm, OffsetRMSNorm, RMSNorm
from lmforge.model.heads import LMHead
from lmforge.train import distributed
from lmforge.train.step import Gradients, Stepper

register_grad_sampler([RMSNorm, HeadNorm])(compute_rms_norm_grad_sample)  # nn.RMSNorm's math, fused on CPU
# d/dw of normed * (1 + w) is normed, as d/dw of normed * w: the same per-sample gradient (Gemma's norm)
register_grad_sampler(OffsetRMSNorm)(compute_rms_norm_grad_sample)
register_grad_sampler(LMHead)(compute_linear_grad_sample)  # an nn.Linear (its forward is Linear's)


@register_grad_sampler(nn.LayerNorm)
def layer_norm_grad_sample(
    layer: nn.LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus's LayerNorm per-sample gradients, for a LayerNorm without bias too (`model.bias =
    false`), whose `bias` is None: Opacus's own sampler reads `layer.bias.requires_grad`."""
    if layer.bias is not None:
        return compute_layer_norm_grad_sample(layer, activations, backprops)
    if not layer.weight.requires_grad:
        return {}
    normed = F.layer_norm(activations[0], layer.normalized_shape, eps=layer.eps)
    return {layer.weight: sum_over_all_but_batch_and_last_n(normed * backprops, layer.weight.dim())}


# The embeddings' inputs are token ids, so their backward hooks see only output gradients, which is
# all Opacus needs; torch warns about it at every backward.
HOOK_WARNING = "Full backward hook is firing when gradients are computed"


class AllOptimizers:
    """The run's optimizers seen as one, so that `DPOptimizer` clips each sample's gradient over every
    parameter together (one clip per optimizer would add up to more than max_grad_norm)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


class Privacy:
    """The DP-SGD state of a run: the noisy optimizer, the accountant and the settings it reports.

    Stateful: its `state_dict` (the accountant's history) goes into every checkpoint."""

    def __init__(
        self,
        settings: PrivacyConfig,
        optimizers: list[torch.optim.Optimizer],
        *,
        sample_rate: float,
        windows: int,
        steps: int,
    ) -> None:
        self.settings, self.sample_rate, self.windows = settings, sample_rate, windows
        self.accountant = create_accountant(settings.accountant)
        self.noise_multiplier = settings.noise_multiplier or get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=settings.accountant,
        )
        self.optimizer = DPOptimizer(
            AllOptimizers(optimizers),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=round(sample_rate * windows),
            loss_reduction="mean",
        )
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before the first step)."""
        return self.accountant.get_epsilon(self.settings.delta) if self.accountant.history else 0.0

    def report(self) -> dict[str, Any]:
        """What a checkpoint's meta.json, metrics.jsonl and the model card say about the guarantee."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.settings.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.settings.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.settings.accountant,
            "unit": f"one of the train split's {self.windows:,} disjoint windows of block_size + 1 tokens",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": dict(self.accountant.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["accountant"].get("mechanism")
        if saved != self.accountant.mechanism():  # Opacus refuses the history with a ValueError
            raise LmforgeError(
                f"privacy.accountant = {self.settings.accountant!r} cannot resume a checkpoint whose "
                f"accountant is {saved!r}: resume with privacy.accountant = {saved!r}"
            )
        self.accountant.load_state_dict(state["accountant"])

    def mark_empty_batch(self) -> None:
        """A Poisson batch with no window: zero per-sample gradients, so the update is noise alone."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def make_private(
    config: Config, module: nn.Module, optimizers: list[torch.optim.Optimizer], *, data: PreparedData
) -> tuple[nn.Module, PoissonWindows, Privacy]:
    """Wrap the model for per-sample gradients; Poisson batches; the noisy optimizer and accountant."""
    if not isinstance(data, PreparedData):  # config validation refuses data.kind = "sft" already
        raise LmforgeError('privacy needs data.kind = "tokens"')
    t = config.train
    batches = PoissonWindows(data.train, config.model.block_size, t.batch_size, seed=t.seed)
    module.per_sample_positions = True
    wrapped = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    privacy = Privacy(
        config.privacy,
        optimizers,
        sample_rate=batches.sample_rate,
        windows=batches.windows,
        steps=t.max_steps,
    )
    return wrapped, batches, privacy


class PrivateStepper(Stepper):
    """`Stepper` with DP-SGD: per-sample gradients of one Poisson batch, clipped and noised."""

    def __init__(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], *, privacy: Privacy, **kwargs: Any
    ) -> None:
        super().__init__(model, optimizers, **kwargs)
        self.privacy = privacy

    def gradients(self, batches: PoissonWindows) -> Gradients:
        x, y = next(batches)
        flops = self.count_flops(x.size(0), x.size(1), None) if self.count_flops and len(x) else 0.0
        loss = 0.0  # an empty batch: logged as 0, its update is noise alone
        if len(x):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            _, mean_loss = self.forward(x, y)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=HOOK_WARNING)
                mean_loss.backward()  # fills each parameter's grad_sample: (batch, *shape)
            loss = mean_loss.item()
        else:
            self.privacy.mark_empty_batch()
        self.privacy.optimizer.pre_step()  # clip, sum, add noise, / expected batch; the accountant steps
        grad_norm = distributed.clip_grad_norm(self.model.parameters(), self.max_grad_norm)
        return Gradients(loss=loss, grad_norm=grad_norm.item(), tokens=x.numel(), flops=flops, stats={})

    def update(self, apply: bool = True) -> None:
        super().update(apply)
        self.privacy.optimizer.zero_grad(set_to_none=True)  # per-sample gradients too
