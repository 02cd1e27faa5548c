"""Forward + backward time of lmforge's fused CPU RMSNorm against PyTorch's `rms_norm` and `layer_norm`.

All three run interleaved in one process (each round times every candidate once; the best of the
rounds is kept, so other jobs on the machine inflate the figures less than a mean would), at a
block's shape (batch, tokens, channels) in fp32 and, like a bf16 training step, under bf16 autocast
with an fp32 residual stream as input. Prints the CPU, the load and each ratio to layer_norm.

    .venv/bin/python benchmarks/rmsnorm.py                      # (16, 512, 256), 30 rounds
    .venv/bin/python benchmarks/rmsnorm.py --shape 32 64 128 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable

import torch

from lmforge.model.gpt import RMSNorm
from lmforge.runtime import native_bf16


def cpu_summary() -> str:
    """Model name and the vector extensions that decide bf16 speed, from /proc/cpuinfo."""
    model, flags = "unknown CPU", []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = [f for f in value.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")]
    return f"{model}, {os.cpu_count()} cpus, flags: {' '.join(flags) or '-'}"


def candidates(d: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The norms compared, each with its own weight (and layer_norm's bias, as GPT-2's has)."""
    fused = RMSNorm(d, eps=1e-5)
    reference = torch.nn.RMSNorm(d, eps=1e-5)
    layer_norm = torch.nn.LayerNorm(d, eps=1e-5)
    return {"layer_norm": layer_norm, "rms_norm (PyTorch)": reference, "rms_norm (lmforge fused)": fused}


def best_times(shape: list[int], dtype: str, rounds: int) -> dict[str, float]:
    """Best forward + backward seconds of each candidate over interleaved rounds."""
    norms = candidates(shape[-1])
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)
    cast = torch.autocast("cpu", torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    best = dict.fromkeys(norms, float("inf"))
    for round in range(rounds + 2):  # two warm-up rounds
        for name, norm in norms.items():
            start = time.perf_counter()
            with cast:
                y = norm(x)
            y.backward(grad.to(y.dtype))
            if round >= 2:
                best[name] = min(best[name], time.perf_counter() - start)
            x.grad = None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 512, 256])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    dtypes = ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]
    for dtype in dtypes:
        best = best_times(args.shape, dtype, args.rounds)
        base = best["layer_norm"]
        for name, seconds in best.items():
            print(
                f"{dtype:>4} {tuple(args.shape)} {name:<26} fwd+bwd {seconds * 1e3:7.2f} ms"
                f"  = {seconds / base:.2f}x layer_norm"
            )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
