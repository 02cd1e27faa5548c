"""Optimizers with weight-decay groups: AdamW, SGD, and Muon for hidden matrices."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from lmforge.config import OptimConfig
from lmforge.model.heads import Head
from lmforge.runtime import native_bf16


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Group parameters by role: hidden matrices, embeddings/head, and vectors (norms, biases)."""
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "embeddings": [], "vectors": []}
    # output heads train as embeddings do (AdamW, never Muon)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, Head))}
    for param in model.parameters():  # parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            groups["embeddings"].append(param)
        elif param.dim() >= 2:
            groups["matrices"].append(param)
        else:
            groups["vectors"].append(param)
    return groups


def _adamw(groups: list[dict], config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=config.betas, eps=config.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels are missing for some devices and dtypes
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iterations in `ns_dtype`, same-shape matrices in one
    batched call. The stock optimizer always iterates in bf16, which CPUs without native bf16
    emulate ~50x slower than fp32. State and hyperparameters are the stock optimizer's, so either
    one resumes the other's checkpoints."""

    def __init__(self, params: list[nn.Parameter], ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for param in params:  # momentum as the stock optimizer does it
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - group["momentum"])
                updates.append(param.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
            orthogonal = orthogonalize(
                updates, group["ns_coefficients"], group["ns_steps"], eps=group["eps"], dtype=self.ns_dtype
            )
            for param, update in zip(params, orthogonal, strict=True):
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * muon_lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def orthogonalize(
    matrices: list[torch.Tensor],
    coefficients: tuple[float, float, float],
    steps: int,
    *,
    eps: float,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Muon's quintic Newton-Schulz iteration towards U Vᵀ of each matrix (as torch.optim.Muon's
    `_zeropower_via_newtonschulz`), in `dtype`, one batched call per distinct shape."""
    a, b, c = coefficients
    result: list[torch.Tensor] = [torch.empty(0)] * len(matrices)
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i, matrix in enumerate(matrices):
        by_shape[matrix.shape].append(i)
    for (rows, cols), indices in by_shape.items():
        x = torch.stack([matrices[i] for i in indices]).to(dtype)  # (n, rows, cols)
        if rows > cols:
            x = x.mT  # iterate on the wide side: (n, cols, rows)
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        if rows > cols:
            x = x.mT
        for j, i in enumerate(indices):
            result[i] = x[j]
    return result


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def build_optimizers(model: nn.Module, config: OptimConfig) -> list[torch.optim.Optimizer]:
    """One optimizer, or two for Muon (Muon for hidden matrices, AdamW for the rest).

    Weight decay applies to matrices only; embeddings and the head get it only with
    `decay_embeddings`, norms and biases never.
    """
    parts = split_parameters(model)
    embed_decay = config.weight_decay if config.decay_embeddings else 0.0

    def groups(with_matrices: bool) -> list[dict]:
        result = [
            {"params": parts["embeddings"], "weight_decay": embed_decay},
            {"params": parts["vectors"], "weight_decay": 0.0},
        ]
        if with_matrices:
            result.insert(0, {"params": parts["matrices"], "weight_decay": config.weight_decay})
        return [g for g in result if g["params"]]

    if config.name == "adamw":
        optimizers = [_adamw(groups(True), config, config.lr)]
    elif config.name == "sgd":
        optimizers = [torch.optim.SGD(groups(True), lr=config.lr, momentum=config.momentum, foreach=True)]
    else:
        matrices = parts["matrices"]
        fast_bf16 = bool(matrices) and native_bf16(matrices[0].device)
        muon = Muon(
            matrices,
            ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32,
            lr=config.muon_lr,
            momentum=config.muon_momentum,
            ns_steps=config.muon_ns_steps,
            weight_decay=config.weight_decay,
        )
        optimizers = [muon, _adamw(groups(False), config, config.lr)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # the schedule scales every group from here
    return optimizers


def apply_settings(optimizers: list[torch.optim.Optimizer], model: nn.Module, config: OptimConfig) -> None:
    """Give `optimizers` (restored from a checkpoint) the hyperparameters `config` builds them with.

    `load_state_dict` restores each group's hyperparameters with the moments, so a resume with another
    peak lr, weight decay, betas or eps would otherwise keep the old ones while the run logs and saves
    the new. The groups are those of `build_optimizers`, so fresh ones give the values."""
    for restored, built in zip(optimizers, build_optimizers(model, config), strict=True):
        for group, fresh in zip(restored.param_groups, built.param_groups, strict=True):
            group.update({key: value for key, value in fresh.items() if key != "params"})


def set_lr_factor(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
