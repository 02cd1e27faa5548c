"""LoRA through `peft`: low-rank adapters on the model's Linear layers, merged for inference.

`peft` wraps the lmforge model as it is (its Linear layers are plain `nn.Linear`), so no
second implementation of LoRA lives here. Checkpoints of a LoRA run hold the wrapped
model's weights (frozen base + adapters), so a LoRA run resumes exactly; sampling, eval and
export merge the adapters into the base weights first.
"""

from __future__ import annotations

import torch

from lmforge.config import LoraConfig
from lmforge.errors import LmforgeError


def apply_lora(model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """Freeze `model` and add rank-`config.rank` adapters to the Linear layers named in `targets`."""
    try:
        import peft
    except ImportError:
        raise LmforgeError("lora.rank > 0 needs peft: pip install 'lmforge[lora]'") from None
    lora = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.targets),
        bias="none",
    )
    return peft.get_peft_model(model, lora)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with the adapters added into its weights."""
    return model.merge_and_unload()
