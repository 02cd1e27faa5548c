"""The model that a checkpoint describes, checked against its stored weights before any memory is
allocated, then built and loaded: LoRA adapters merged, in eval mode, on its device.

The sha256 list of a checkpoint catches damage, not a lie: a config.toml edited with its hash updated
may describe a model of any size. So the model is first built on the meta device (shapes, no memory),
every parameter and persistent buffer is compared by name and shape with the header of
model.safetensors (no tensor data is read), and the memory the config asks for beyond the weights
(RoPE's cos and sin tables, block_size x head_dim) is bounded. Only then is the model allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lmforge.checkpoint import VerifiedCheckpoint, load_weights, stored_shapes
from lmforge.config import LoraConfig, ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT
from lmforge.model.lora import apply_lora, merge_lora

# What a config may allocate beyond its stored weights, where the weights themselves take less: RoPE's
# tables for a context of a million tokens (config.MAX_BLOCK_SIZE) at head_dim 128 in fp32, what a
# genuine long-context model needs. Without a bound, a config could ask for 8 MiB x d_model in them.
UNSTORED_BYTES_ALLOWED = 1 << 30

Shape = tuple[int, ...]


def build_model(checkpoint: VerifiedCheckpoint, device: torch.device, *, weights: bool) -> GPT:
    """The checkpoint's model with its weights on `device`; without `weights`, on the meta device
    with none (its configuration without its memory). Either way checked first (`described_model`)."""
    config = checkpoint.config
    described = described_model(checkpoint)
    if not weights:
        return (merge_lora(described) if config.lora.rank > 0 else described).eval()
    # Allocated only now, and initialised as training does (a caller's random stream moves on as before)
    model: nn.Module = GPT(config.model)
    if config.lora.rank > 0:  # weights are stored with their adapters: load, then merge
        model = apply_lora(model, config.lora)
        load_weights(checkpoint.path, model)
        model = merge_lora(model)
    else:
        load_weights(checkpoint.path, model)
    return model.to(device).eval()


def described_model(checkpoint: VerifiedCheckpoint) -> nn.Module:
    """The model that config.toml describes, on the meta device, checked to be exactly what
    model.safetensors stores and to need no more memory beyond it than `check_unstored_memory` allows."""
    path, config = checkpoint.path, checkpoint.config
    stored = stored_shapes(path)
    # Every block stores tensors, so a config deeper than the file has tensors does not fit it: it is
    # built only that deep, which finds its first missing tensor and bounds the work a config can ask for.
    depth = min(config.model.n_layer, len(stored) + 1)
    model = _on_meta(dataclasses.replace(config.model, n_layer=depth), config.lora)
    check_fit(path, model, stored)
    if depth < config.model.n_layer:  # check_fit has found a block missing unless blocks store nothing
        raise LmforgeError(f"{path}: config.toml's model.n_layer = {config.model.n_layer} is not stored")
    check_unstored_memory(path, model)
    return model


def _on_meta(model: ModelConfig, lora: LoraConfig) -> nn.Module:
    """The model `model` describes on the meta device, wrapped in LoRA adapters as a LoRA run's
    checkpoint stores it."""
    with torch.device("meta"), _NoInitOnMeta():
        built: nn.Module = GPT(model)
        return apply_lora(built, lora) if lora.rank > 0 else built


class _NoInitOnMeta(TorchFunctionMode):
    """`torch.nn.init` does nothing to meta tensors: they hold no values, and PyTorch would set them
    through Python reference code that imports torch._dynamo (seconds, on a command's first load)."""

    # PyTorch calls this with four positional arguments: its signature is fixed
    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def described_tensors(model: nn.Module) -> list[tuple[tuple[str, ...], Shape]]:
    """Each parameter and persistent buffer of `model` once, in the model's order: its names (a tied
    weight has two, of which a checkpoint stores one) and its shape."""
    names: dict[int, list[str]] = {}
    shapes: dict[int, Shape] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: tied weights are one object
        names.setdefault(id(tensor), []).append(name)
        shapes[id(tensor)] = tuple(tensor.shape)
    return [(tuple(aliases), shapes[key]) for key, aliases in names.items()]


def check_fit(path: Path, model: nn.Module, stored: dict[str, Shape]) -> None:
    """Every tensor of `model` is stored with its shape, and nothing else is stored; else a one-line
    error naming the first tensor that differs, with the shape the config implies and the one stored."""
    misfit = f"{path}: config.toml does not fit model.safetensors"
    described = described_tensors(model)
    for aliases, shape in described:
        found = [name for name in aliases if name in stored]
        if not found:
            raise LmforgeError(f"{misfit}: {aliases[0]} {list(shape)} by the config is not stored")
        for name in found:
            if stored[name] != shape:
                raise LmforgeError(
                    f"{misfit}: {name} is {list(shape)} by the config but {list(stored[name])} stored"
                )
    known = {name for aliases, _ in described for name in aliases}
    if extra := [name for name in stored if name not in known]:
        raise LmforgeError(
            f"{misfit}: {extra[0]} {list(stored[extra[0]])} is stored but not in the model the config "
            f"describes ({len(extra)} such tensors)"
        )


def check_unstored_memory(path: Path, model: nn.Module) -> None:
    """What `model` allocates beyond its stored weights (non-persistent buffers: RoPE's tables) is at
    most the size of model.safetensors or UNSTORED_BYTES_ALLOWED, whichever is more."""
    persistent = model.state_dict().keys()
    unstored = [(name, b) for name, b in model.named_buffers() if name not in persistent]
    total = sum(b.numel() * b.element_size() for _, b in unstored)
    limit = max((path / "model.safetensors").stat().st_size, UNSTORED_BYTES_ALLOWED)
    if total > limit:
        name, largest = max(unstored, key=lambda item: item[1].numel())
        raise LmforgeError(
            f"{path}: config.toml asks for {total / 2**30:.1f} GiB beyond the stored weights ({name} is "
            f"{list(largest.shape)}), more than the {limit / 2**30:.1f} GiB allowed (the size of "
            "model.safetensors, or 1 GiB if that is less)"
        )
