"""Device, precision, seeding and speed-of-light helpers shared by training, eval and sampling."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "0" or "1" forces the answer of `native_bf16`: tests take the other machine kind's code path with it.
NATIVE_BF16_ENV = "LMFORGE_NATIVE_BF16"


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware. Where it does not (e.g. CPUs without
    AVX-512: oneDNN emulates bf16 there, ~50x slower than fp32), bf16 is a slow path."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise LmforgeError(f"{NATIVE_BF16_ENV} must be 0 or 1, got {forced!r}")
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # oneDNN's bf16 check passes on any AVX-512 CPU; bf16 arithmetic needs AVX512_BF16 or AMX
        hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return hardware and onednn
    return False


_warned_emulated: set[str] = set()


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where `device` computes bf16 natively, else fp32. Other names stand;
    an explicit bf16 where it is emulated runs, with a warning (once per process and device)."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and not native_bf16(device) and str(device) not in _warned_emulated:
        _warned_emulated.add(str(device))
        print(
            f"warning: bf16 is emulated on {device} here (no native bf16 matmul), so it runs many times "
            'slower than fp32; train.dtype = "auto" picks fp32 on this machine',
            file=sys.stderr,
        )
    return name


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


def matmul_peak_flops(device: torch.device, dtype: str) -> float:
    """Measured dense-matmul FLOP/s for this device and dtype: the denominator of MFU.

    Where bf16 is emulated the fp32 peak stands in: it is the most this hardware does, and timing
    the emulated path would take seconds. Measured once per device and dtype in a process.
    """
    if dtype == "bf16" and not native_bf16(device):
        dtype = "fp32"
    return _measured_peak(device, dtype)


@functools.cache
def _measured_peak(device: torch.device, dtype: str, seconds: float = 0.1) -> float:
    # Near the plateau of FLOP/s against size, yet milliseconds per product: on a CPU a tall,
    # thin product (2048 x 2048 @ 2048 x 256, 2 GFLOP) runs as fast per FLOP as a 2048³ one.
    m, n = (8192, 8192) if device.type == "cuda" else (2048, 256)
    a = torch.full((m, m), 0.5, device=device, dtype=DTYPES[dtype])  # no RNG use: seeding stays exact
    b = torch.full((m, n), 0.25, device=device, dtype=DTYPES[dtype])
    a @ b  # warm-up
    synchronize(device)
    # The fastest product, not the mean: a start-up thread still busy beside the first products (or a
    # clock still ramping up) would lower the peak, and MFU would read over 100%.
    fastest, runs, start = math.inf, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        began = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - began)
        runs += 1
    return 2 * m * m * n / fastest
