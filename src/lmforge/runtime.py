"""Device, precision, seeding and speed-of-light helpers shared by training, eval and sampling."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "0" or "1" forces the answer of `native_bf16`: tests take the other machine kind's code path with it.
NATIVE_BF16_ENV = "LMFORGE_NATIVE_BF16"


def resolve_device(name: str, *, option: str = "train.device") -> torch.device:
    """`auto` picks CUDA when present, else CPU; a name that is not a device lmforge runs on, or an
    unavailable one, is a clear error naming `option` (train.device, or a verb's --device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string at all ("tpu", "cuda:x")
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise LmforgeError(f"{option} must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"{option} is {name!r} but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError(f"{option} is {name!r} but MPS is not available here")
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
        logger.warning(
            f"bf16 is emulated on {device} here (no native bf16 matmul), so it runs many times "
            'slower than fp32; train.dtype = "auto" picks fp32 on this machine'
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


# Dense peak FLOP/s per device and dtype from the datasheets (tensor cores; fp32 is true fp32: lmforge
# leaves TF32 off): the denominator of MFU as the field defines it.
DEVICE_PEAK_FLOPS = {
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
}
PEAK_CACHE_FILE = "matmul-peak.json"  # in the cache dir: the best peak measured per machine, dtype, threads


@dataclass(frozen=True)
class Peak:
    """The denominator of MFU: peak FLOP/s, and where the figure comes from."""

    flops: float
    source: str  # for people: "h100 bf16 dense, datasheet", "measured, the best on this machine"
    measured: bool  # timed here, not a datasheet's: the ratio is then no MFU as the field means it

    @property
    def name(self) -> str:
        """What model FLOP/s over this peak are called."""
        return "fraction of measured matmul peak" if self.measured else "MFU"

    @property
    def key(self) -> str:
        """The ratio's key in metrics.jsonl (`over_peak` instead when above 1)."""
        return "matmul_peak_fraction" if self.measured else "mfu"

    def times(self, devices: int) -> Peak:
        """The peak of `devices` such devices: a data-parallel job's."""
        return dataclasses.replace(self, flops=self.flops * devices)

    def entry(self, flops_per_s: float) -> dict[str, float]:
        """Metrics fields of a step that ran `flops_per_s` model FLOP/s: the ratio and this peak. Over 1
        the ratio is a measurement error (a peak measured too low), logged as `over_peak`, not as MFU."""
        fraction = flops_per_s / self.flops
        return {(self.key if fraction <= 1 else "over_peak"): fraction, "peak_flops": self.flops}

    def describe(self, flops_per_s: float) -> str:
        """`flops_per_s` against this peak, for people; over it, a measurement error and no MFU."""
        fraction = flops_per_s / self.flops
        if fraction > 1:
            return (
                f"{format_flops(flops_per_s)}, over the peak of {format_flops(self.flops)} ({self.source}): "
                "a measurement error, no MFU"
            )
        return f"{self.name} {fraction:.1%} (peak {format_flops(self.flops)}, {self.source})"


def format_flops(flops: float) -> str:
    """FLOP/s in TFLOP/s, or GFLOP/s below a teraflop."""
    return f"{flops / 1e12:,.4g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.4g} GFLOP/s"


def device_peak(device: torch.device, dtype: str) -> Peak:
    """The MFU denominator of one `device` in `dtype`: a GPU's dense datasheet peak where
    DEVICE_PEAK_FLOPS lists it, else the best matmul peak measured on this machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = datasheet_kind(name)
        if kind is not None and dtype in DEVICE_PEAK_FLOPS[kind]:
            return Peak(DEVICE_PEAK_FLOPS[kind][dtype], f"{kind} {dtype} dense, datasheet", measured=False)
        return Peak(matmul_peak_flops(device, dtype), f"measured: {name} is not in the datasheet table", True)
    return Peak(matmul_peak_flops(device, dtype), "measured, the best on this machine", measured=True)


def datasheet_kind(name: str) -> str | None:
    """The DEVICE_PEAK_FLOPS row of a CUDA device name, None if it has none. The H100 and H200
    rows are the SXM parts': their PCIe and NVL cards run at lower clocks and are not matched."""
    name = name.upper()
    if "A100" in name:  # PCIe and SXM: the same 312 TFLOP/s
        return "a100"
    for kind in ("h200", "h100"):
        if kind.upper() in name and "PCIE" not in name and "NVL" not in name:
            return kind
    return None


def matmul_peak_flops(device: torch.device, dtype: str) -> float:
    """The highest dense-matmul FLOP/s measured for this device and dtype on this machine.

    A peak probed while other jobs share the machine reads low and would inflate every MFU of the
    run, so the probe's result is kept per machine (`machine_key`) in the cache dir, and the best
    one ever measured there is the answer (the probe runs once per process). Where bf16 is emulated
    the fp32 peak stands in: it is the most this hardware does, and timing the emulated path would
    take seconds.
    """
    if dtype == "bf16" and not native_bf16(device):
        dtype = "fp32"
    return best_peak(machine_key(device, dtype), _measured_peak(device, dtype))


def machine_key(device: torch.device, dtype: str) -> str:
    """What a measured peak belongs to: the processor model, the dtype and, on a CPU, the threads."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)} {dtype}"
    return f"{device.type} {processor_model()} {dtype} {torch.get_num_threads()} threads"


def processor_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_peak(key: str, measured: float) -> float:
    """The larger of `measured` and the peak cached under `key`, which it replaces if larger. An
    unreadable cache counts as empty, an unwritable one is left as it is: neither stops a run."""
    from lmforge.files import cache_dir

    path = cache_dir() / PEAK_CACHE_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        peaks = {k: float(v) for k, v in cached.items()} if isinstance(cached, dict) else {}
    except (OSError, ValueError, TypeError):
        peaks = {}
    peaks = {k: v for k, v in peaks.items() if 0 < v < math.inf}
    if measured <= peaks.get(key, 0.0):
        return peaks[key]
    peaks[key] = measured
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent runs each rename their own
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(peaks, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    return measured


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
