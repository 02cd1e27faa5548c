"""Forward + backward time of lmforge's CPU RMSNorm against PyTorch's `rms_norm` and `layer_norm`.

lmforge's norm has two paths: its compiled kernel (`lmforge.model.cpu_kernels`, built with the
system's C compiler) and the aten passes it falls back to without one. All four run interleaved in
one process (each round times every candidate once, in a shuffled order; the best of the rounds is
kept, so other jobs on the machine inflate the figures less than a mean would), at the shapes that
matter: a block's (16, 512, 256), the speedrun's block (32, 64, 128) and its QK-norm (32, 64, 4,
32), whose input is a strided view of the qkv projection's output as in attention. fp32, and, where
the CPU has native bf16 (or LMFORGE_NATIVE_BF16=1), like a bf16 training step: under bf16 autocast,
the block norms fed the fp32 residual stream, the QK-norm a bf16 qkv output. With one thread the
clock is the thread's CPU time (a descheduled round costs nothing); with more, wall time. Then the
single calls the norms are made of, timed the same way at the first shape: the aten passes over
memory, the kernel's one call each way, and layer_norm's two kernels. Prints the CPU, the load and
each ratio to layer_norm.

    .venv/bin/python benchmarks/rmsnorm.py --threads 1         # the three shapes, 30 rounds
    .venv/bin/python benchmarks/rmsnorm.py --shape 16 512 256  # one block shape
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.model import cpu_kernels
from lmforge.model.gpt import HeadNorm, RMSNorm, _FusedRMSNorm
from lmforge.runtime import native_bf16

SHAPES = {  # name: (shape, whether the input is a strided q view of a qkv output)
    "block": ((16, 512, 256), False),
    "speedrun block": ((32, 64, 128), False),
    "speedrun QK-norm": ((32, 64, 4, 32), True),
}


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


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def clock() -> Callable[[], float]:
    """The thread's CPU time with one torch thread (no descheduled rounds), wall time otherwise."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def candidates(d: int, *, qk: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The norms compared, each with its own weight (and layer_norm's bias, as GPT-2's has). The
    QK-norm's weight follows its input's dtype (HeadNorm), in PyTorch's rms_norm too."""
    fused = HeadNorm(d, eps=1e-5) if qk else RMSNorm(d, eps=1e-5)
    reference = torch.nn.RMSNorm(d, eps=1e-5)
    layer_norm = torch.nn.LayerNorm(d, eps=1e-5)
    passes = torch.nn.RMSNorm(d, eps=1e-5)

    def aten_passes(x: torch.Tensor) -> torch.Tensor:  # the fallback without a C compiler
        return _FusedRMSNorm.apply(x, passes.weight.to(x.dtype) if qk else passes.weight, 1e-5, False)

    return {
        "layer_norm": layer_norm,
        "rms_norm (PyTorch)": (
            (lambda x: F.rms_norm(x, (d,), reference.weight.to(x.dtype), 1e-5)) if qk else reference
        ),
        "lmforge aten passes": aten_passes,
        **({"lmforge kernel": fused} if cpu_kernels.library() is not None else {}),
    }


def norm_input(shape: tuple[int, ...], *, qk: bool, bf16: bool) -> torch.Tensor:
    """The norm's input: the fp32 residual stream, or for the QK-norm the q part of a qkv output
    (B, T, 3 heads, head_dim), in bf16 as autocast's linear makes it."""
    if not qk:
        return torch.randn(*shape, requires_grad=True)
    B, T, H, hd = shape
    qkv = torch.randn(B, T, 3 * H, hd, dtype=torch.bfloat16 if bf16 else torch.float32, requires_grad=True)
    return qkv[:, :, :H]


def best_times(shape: tuple[int, ...], *, qk: bool, bf16: bool, rounds: int) -> dict[str, float]:
    """Best forward + backward seconds of each candidate over interleaved rounds."""
    norms, now = candidates(shape[-1], qk=qk), clock()
    x = norm_input(shape, qk=qk, bf16=bf16)
    leaf = x if x.is_leaf else x._base
    grads = {dtype: torch.randn(*shape, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    cast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    best = dict.fromkeys(norms, float("inf"))
    order, shuffle = list(norms), random.Random(0).shuffle
    for round in range(rounds + 2):  # two warm-up rounds
        # a new order each round: whatever runs right after PyTorch's rms_norm (which allocates and
        # frees many whole-tensor temporaries) measured 1.3-1.5x slower, the fused norm and layer_norm alike
        shuffle(order)
        for name in order:
            norm = norms[name]
            start = now()
            with cast:
                y = norm(x)
            y.backward(grads[y.dtype])
            if round >= 2:
                best[name] = min(best[name], now() - start)
            leaf.grad = None
    return best


def op_times(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Best seconds of each call of the norms (layer_norm's kernels, the aten passes, lmforge's
    kernel with its Python wrapper), fp32, interleaved."""
    d, aten, now = shape[-1], torch.ops.aten, clock()
    x, grad, weight, bias = torch.randn(*shape), torch.randn(*shape), torch.randn(d), torch.randn(d)
    rstd, zero = torch.rand(*shape[:-1], 1) + 0.5, torch.zeros(*shape[:-1], 1)
    out = torch.empty_like(x)
    ops = {
        "layer_norm forward (native_layer_norm)": lambda: aten.native_layer_norm(x, [d], weight, bias, 1e-5),
        "layer_norm backward (dx, dweight, dbias)": lambda: aten.native_layer_norm_backward(
            grad, x, [d], zero, rstd, weight, bias, [True, True, True]
        ),
        "passes fwd 1: vector_norm (read x)": lambda: torch.linalg.vector_norm(
            x, dim=-1, keepdim=True, dtype=torch.float32
        ),
        "passes fwd 2: x * rstd (read x, write y)": lambda: torch.mul(x, rstd, out=out),
        "passes fwd 3: y *= weight (read, write y)": lambda: out.mul_(weight),
        "passes bwd 1: layer_norm backward (dx, dweight)": lambda: aten.native_layer_norm_backward(
            grad, x, [d], zero, rstd, weight, None, [True, True, False]
        ),
        "passes bwd 2: grad @ weight (read grad)": lambda: torch.mv(grad.view(-1, d), weight),
        "passes bwd 3: dx += rstd·mean (read, write dx)": lambda: out.add_(rstd),
    }
    if cpu_kernels.library() is not None:
        ops["kernel fwd (read x, write y)"] = lambda: cpu_kernels.rms_norm_forward(x, weight, 1e-5)
        ops["kernel bwd (read x, grad, write dx)"] = lambda: cpu_kernels.rms_norm_backward(
            grad, x, weight, rstd=rstd, wanted=(True, True)
        )
    best, results = dict.fromkeys(ops, float("inf")), {}
    for round in range(rounds + 2):
        for name, op in ops.items():
            start = now()
            # the previous result is freed after the new one is made: freed at once, a whole-tensor
            # result can make malloc hand the memory back and page-fault it in again every round
            results[name] = op()
            if round >= 2:
                best[name] = min(best[name], now() - start)
    return best


def print_ops(shape: tuple[int, ...], rounds: int) -> None:
    best = op_times(shape, rounds)
    print(f"single calls, fp32 {shape} (best of {rounds}):")
    for name, seconds in best.items():
        print(f"  {name:<48} {seconds * 1e3:7.3f} ms")
    total = {
        prefix: sum(seconds for name, seconds in best.items() if name.startswith(prefix))
        for prefix in ("layer_norm", "passes", "kernel")
    }
    sums = ", ".join(
        f"{name} {total[prefix] * 1e3:.3f} ms = {total[prefix] / total['layer_norm']:.2f}x"
        for prefix, name in (("passes", "aten passes"), ("kernel", "kernel"))
        if total[prefix] > 0
    )
    print(f"  sum: layer_norm {total['layer_norm'] * 1e3:.3f} ms, {sums} (no autograd)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=None, help="one block shape instead")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock_name = "thread CPU time" if torch.get_num_threads() == 1 else "wall time"
    print(f"{cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {clock_name}")
    if cpu_kernels.library() is None:
        print("lmforge's CPU kernel is not available here: its rows are left out")
    print(f"load average before: {load()}")
    shapes = {"--shape": (tuple(args.shape), False)} if args.shape else SHAPES
    dtypes = ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]
    for label, (shape, qk) in shapes.items():
        for dtype in dtypes:
            best = best_times(shape, qk=qk, bf16=dtype == "bf16", rounds=args.rounds)
            base = best["layer_norm"]
            for name, seconds in best.items():
                print(
                    f"{dtype:>4} {label} {shape} {name:<26} fwd+bwd {seconds * 1e3:7.3f} ms"
                    f"  = {seconds / base:.2f}x layer_norm"
                )
    print_ops(next(iter(shapes.values()))[0], args.rounds)
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
