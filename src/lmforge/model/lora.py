"""LoRA through `peft`: low-rank adapters on the model's Linear layers, merged for inference.

`peft` wraps the lmforge model as it is (its Linear layers are plain `nn.Linear`), so no
second implementation of LoRA lives here. Checkpoints of a LoRA run hold the wrapped
model's weights (frozen base + adapters), so a LoRA run resumes exactly; sampling, eval and
export merge the adapters into the base weights first.

With `lora.base_dtype` below fp32 the frozen matrices of the blocks are held in bf16, or as
torchao's int8 (per row) or NF4 tensors (QLoRA's 4-bit NormalFloat, double-quantized scales),
while the adapters train in fp32. Such a run's checkpoints store that base dequantized (the exact
function trained), so inference, export and `train.init_from` read them as any LoRA run's.
Quantizing is not idempotent (re-quantizing a dequantized int8 matrix shrinks its scale), so a
resume does not quantize the stored base again: it quantizes train.init_from's weights as the run
first did, bit for bit, and checks that they dequantize to the stored base.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import LoraConfig
from lmforge.errors import LmforgeError

NF4_BLOCK = 64  # QLoRA's: elements per absmax block of an NF4 matrix
NF4_SCALER_BLOCK = 256  # QLoRA's: block scales per block of the second (int8) quantization


def import_peft(why: str = "lora.rank > 0") -> types.ModuleType:
    """peft, or a one-line error saying that `why` needs it. peft imports torchao where it is
    installed, and that import warns about CUDA kernels a CPU build cannot load: done quietly first."""
    _torchao()
    try:
        with _quiet_torchao():
            import peft
    except ImportError:
        raise LmforgeError(f"{why} needs peft: pip install 'lmforge[lora]'") from None
    return peft


def apply_lora(model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """Freeze `model` and add rank-`config.rank` adapters to the Linear layers named in `targets`."""
    peft = import_peft()
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


def lower_base_precision(model: nn.Module, base_dtype: str) -> nn.Module:
    """Hold every frozen Linear matrix of `model`'s blocks (a LoRA-wrapped model) in `base_dtype`,
    in place; the embeddings, norms, head and adapters keep their precision. Returns `model`."""
    if base_dtype == "fp32":
        return model
    frozen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "blocks." in name and not module.weight.requires_grad
    ]
    for name, linear in frozen:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, FrozenLinear(linear, base_dtype, name=name))
    return model


class FrozenLinear(nn.Module):
    """A frozen Linear layer whose weight is held in a low precision and dequantized on use.

    Backward saves the low-precision weight (not a dequantized copy) and dequantizes it again, so
    the memory saved holds through the whole step. Its state dict holds the dequantized weight."""

    def __init__(self, linear: nn.Linear, base_dtype: str, *, name: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.base_dtype = base_dtype
        self.weight = nn.Parameter(
            quantize(linear.weight.detach(), base_dtype, name=name), requires_grad=False
        )
        self.bias = linear.bias  # frozen, and small: kept as it is

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenLinearFunction.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # in the autocast dtype, as F.linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, base_dtype={self.base_dtype}"
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *hook_args: Any) -> None:
        """Load the bias as usual; the weight stays as quantized, once it is checked to be the stored one.
        (nn.Module's hook; `hook_args`: local_metadata, strict, missing_keys, unexpected_keys, error_msgs.)"""
        key = prefix + "weight"
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, *hook_args)
        if key not in state_dict:
            return  # reported missing by nn.Module
        missing_keys = hook_args[2]
        missing_keys.remove(key)
        expected = self.dequantized()
        stored = state_dict[key]
        if stored.shape != expected.shape or not torch.equal(stored.to(expected.device), expected):
            raise LmforgeError(
                f"{key}: the stored frozen base is not train.init_from's weights in {self.base_dtype} "
                "(resume with the train.init_from the run started from)"
            )


class _FrozenLinearFunction(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly, in forward and again in backward (torchao's
    `linear_nf4` does the same for NF4 alone). Under autocast W is dequantized straight to the
    autocast dtype; only x gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return F.linear(x, dequantize(weight, dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad_out @ dequantize(weight, grad_out.dtype), None


def quantize(weight: torch.Tensor, base_dtype: str, *, name: str) -> torch.Tensor:
    """`weight` in `base_dtype`: a bf16 tensor, or torchao's Int8Tensor (per row) or NF4Tensor."""
    if base_dtype == "bf16":
        return weight.to(torch.bfloat16)
    torchao = _torchao()
    if torchao is None:
        raise LmforgeError(f"lora.base_dtype = {base_dtype!r} needs torchao: pip install 'lmforge[lora]'")
    if base_dtype == "int8":
        return torchao.Int8Tensor.from_hp(weight, granularity=torchao.PerRow())
    if weight.numel() % NF4_BLOCK:
        raise LmforgeError(
            f"lora.base_dtype = 'nf4': {name} has {weight.numel()} weights, not a multiple of the "
            f"NF4 block of {NF4_BLOCK}"
        )
    # QLoRA's 256 scales per second-level block where the matrix has a multiple of them (real models
    # do); a small matrix takes the largest divisor of its block count that is at most 256
    scaler_block = math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
    return torchao.to_nf4(weight.contiguous(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A plain tensor of `dtype` with the values that `weight` (from `quantize`) holds."""
    if weight.dtype == torch.bfloat16 or type(weight).__name__ == "NF4Tensor":
        return weight.to(dtype)  # NF4Tensor.to(dtype) dequantizes
    return weight.dequantize(dtype)  # torchao's Int8Tensor


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """Importing torchao logs a warning for each CUDA-only kernel library that a CPU build of torch
    cannot load, and torch one for each of torchao's enums it registers: neither is the user's concern."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@functools.cache
def _torchao() -> types.SimpleNamespace | None:
    """The parts of torchao used here, imported once; None where it is not installed."""
    try:
        with _quiet_torchao():
            from torchao.quantization import Int8Tensor, PerRow, to_nf4
    except ImportError:
        return None
    return types.SimpleNamespace(Int8Tensor=Int8Tensor, PerRow=PerRow, to_nf4=to_nf4)
