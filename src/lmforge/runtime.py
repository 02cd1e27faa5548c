"""Device, precision, seeding and speed-of-light helpers shared by training, eval and sampling."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"train.device is {name!r} but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError(f"train.device is {name!r} but MPS is not available here")
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass (a no-op in fp32)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise LmforgeError("train.dtype fp16 needs CUDA (it relies on a grad scaler); use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: str, seconds: float = 0.15) -> float:
    """Measured dense-matmul FLOP/s for this device and dtype: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 2048  # big enough to reach the plateau of the curve
    a = torch.full((n, n), 0.5, device=device, dtype=DTYPES[dtype])  # no RNG use: seeding stays exact
    b = torch.full((n, n), 0.25, device=device, dtype=DTYPES[dtype])
    a @ b  # warm-up
    synchronize(device)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        a @ b
        runs += 1
        if runs % 4 == 0:
            synchronize(device)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2 * n**3 * runs / elapsed
