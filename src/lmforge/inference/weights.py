"""The model that a checkpoint describes, built and loaded with its weights: LoRA adapters merged,
in eval mode, on its device."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.checkpoint import VerifiedCheckpoint, load_weights
from lmforge.model.gpt import GPT
from lmforge.model.lora import apply_lora, merge_lora


def build_model(checkpoint: VerifiedCheckpoint, device: torch.device, *, weights: bool) -> GPT:
    """The checkpoint's model with its weights on `device`; without `weights`, on the meta device
    with none (its configuration without its memory)."""
    config = checkpoint.config
    if not weights:
        with torch.device("meta"):
            return GPT(config.model).eval()
    model: nn.Module = GPT(config.model)
    if config.lora.rank > 0:  # weights are stored with their adapters: load, then merge
        model = apply_lora(model, config.lora)
        load_weights(checkpoint.path, model)
        model = merge_lora(model)
    else:
        load_weights(checkpoint.path, model)
    return model.to(device).eval()
