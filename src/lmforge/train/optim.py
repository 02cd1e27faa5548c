"""Optimizers with weight-decay groups: AdamW, SGD, and Muon for hidden matrices."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import OptimConfig


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Group parameters by role: hidden matrices, embeddings/head, and vectors (norms, biases)."""
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "embeddings": [], "vectors": []}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    if head is not None:
        embedding_ids.add(id(head.weight))
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
        muon = torch.optim.Muon(
            parts["matrices"],
            lr=config.muon_lr,
            momentum=config.muon_momentum,
            weight_decay=config.weight_decay,
        )
        optimizers = [muon, _adamw(groups(False), config, config.lr)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # the schedule scales every group from here
    return optimizers


def set_lr_factor(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
