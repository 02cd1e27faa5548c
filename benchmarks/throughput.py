"""Steady-state training throughput: tokens/s, ms/step, MFU and peak memory.

Each measurement runs in a fresh process (so peak memory and compile caches are its own)
and times the real training step (`lmforge.train.step.Stepper`) on random tokens,
after warm-up steps. The FLOPs are training's own count (`GPT.training_flops`: causal attention is
half the score matrix), over training's peak (`lmforge.runtime.device_peak`): on a GPU in its table
the dense datasheet peak (MFU), elsewhere the best matmul measured on this machine for the dtype in
use (a fraction of measured matmul peak); above 100% a measurement error, not an MFU.

    .venv/bin/python benchmarks/throughput.py                      # nanoGPT recipe: fp32 / bf16 / compile
    .venv/bin/python benchmarks/throughput.py --sweep --plot out/throughput.png   # d_model x block_size
    .venv/bin/python benchmarks/throughput.py \\
        --config src/lmforge/recipes/speedrun-shakespeare-char-cpu.toml --modes bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.runtime import Peak

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "src" / "lmforge" / "recipes"  # the packaged recipes
DEFAULT_CONFIG = RECIPES_DIR / "nanogpt-shakespeare-char-cpu.toml"
MODES = {
    "fp32": ["train.dtype=fp32"],
    "bf16": ["train.dtype=bf16"],
    "fp32+compile": ["train.dtype=fp32", "train.compile=true"],
    "bf16+compile": ["train.dtype=bf16", "train.compile=true"],
}


def measure(config_path: Path, overrides: list[str], steps: int, warmup: int, budget_s: float = 1e9) -> dict:
    """Time up to `steps` training steps (at least 3, at most `budget_s` seconds) after `warmup` ones."""
    import numpy as np
    import torch

    from lmforge.config import load_config
    from lmforge.data.loader import RandomWindows
    from lmforge.model import GPT
    from lmforge.runtime import autocast, device_peak, resolve_device, resolve_dtype, synchronize
    from lmforge.train.optim import build_optimizers
    from lmforge.train.run import with_dtype
    from lmforge.train.step import Stepper, StepSettings

    config = load_config(config_path, overrides)
    device = resolve_device(config.train.device)
    config = with_dtype(config, resolve_dtype(config.train.dtype, device))
    m, t = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or 65), config.train
    torch.manual_seed(t.seed)
    tokens = (
        np.random.default_rng(0)
        .integers(0, m.vocab_size, size=max(200_000, 4 * m.block_size * t.batch_size), dtype=np.int64)
        .astype(np.uint32)
    )
    batches = RandomWindows(tokens, m.block_size, t.batch_size, seed=t.seed)
    model = GPT(m).to(device)
    optimizers = build_optimizers(model, config.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=t.dtype == "fp16")
    stepper = Stepper(
        model,
        optimizers,
        scaler=scaler,
        amp=autocast(device, t.dtype),
        device=device,
        settings=StepSettings(
            grad_accum_steps=t.grad_accum_steps, grad_clip=config.optim.grad_clip, compile=t.compile
        ),
        count_flops=model.training_flops,
    )
    peak = device_peak(device, t.dtype)
    times: list[float] = []
    while len(times) < warmup + steps and (len(times) < warmup + 3 or sum(times[warmup:]) < budget_s):
        start = time.perf_counter()
        done = stepper.gradients(batches)
        stepper.update()
        synchronize(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[warmup:])
    tokens_per_step = done.tokens
    tokens_per_s = tokens_per_step / step_s
    memory = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "params": model.num_params(),
        "tokens_per_step": tokens_per_step,
        "first_step_s": times[0],
        "ms_per_step": 1000 * step_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": done.flops / tokens_per_step,
        **peak.entry(done.flops / step_s),  # mfu or matmul_peak_fraction (over_peak above 1), peak_flops
        "peak_source": peak.source,
        "peak_measured": peak.measured,
        "peak_memory_mb": memory / 2**20,
    }


def run_child(config: Path, overrides: list[str], steps: int, warmup: int, budget_s: float = 1e9) -> dict:
    spec = {
        "config": str(config),
        "overrides": overrides,
        "steps": steps,
        "warmup": warmup,
        "budget_s": budget_s,
    }
    args = [sys.executable, __file__, "--child", json.dumps(spec)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"measurement failed ({overrides}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_of(r: dict) -> Peak:
    """The row's peak, as `lmforge.runtime.device_peak` gave it in the measuring process."""
    from lmforge.runtime import Peak

    return Peak(r["peak_flops"], r["peak_source"], r["peak_measured"])


def line(label: str, r: dict) -> str:
    utilisation = peak_of(r).describe(r["flops_per_token"] * r["tokens_per_s"])
    return (
        f"{label:<28} {r['ms_per_step']:8.1f} ms/step {r['tokens_per_s']:10,.0f} tok/s  {utilisation}  "
        f"first step {r['first_step_s']:5.1f} s  peak mem {r['peak_memory_mb']:,.0f} MB"
    )


def peak_fraction(r: dict) -> float:
    """The row's model FLOP/s over the peak, whichever its key (NaN above 1: no MFU to plot)."""
    return r.get("mfu", r.get("matmul_peak_fraction", float("nan")))


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for block in args.blocks:
        for d_model in args.d_models:
            batch = max(1, args.tokens_per_step // block)
            overrides = [
                f"model.d_model={d_model}",
                f"model.n_head={max(1, d_model // 64)}",
                f"model.block_size={block}",
                f"train.batch_size={batch}",
                f"train.dtype={args.dtype}",
                *args.set,
            ]
            r = run_child(args.config, overrides, args.steps, warmup=1, budget_s=args.budget_s)
            r.update(d_model=d_model, block_size=block, batch_size=batch)
            rows.append(r)
            print(line(f"d_model {d_model} block {block}", r), flush=True)
    return rows


def plot(rows: list[dict], path: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for block in sorted({r["block_size"] for r in rows}):
        points = sorted(
            (r["d_model"], r["tokens_per_s"], peak_fraction(r)) for r in rows if r["block_size"] == block
        )
        ax_tok.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"block {block}")
        ax_mfu.plot([p[0] for p in points], [100 * p[2] for p in points], marker="o", label=f"block {block}")
    ax_tok.set(xlabel="d_model", ylabel="tokens/s", yscale="log", title=f"Training throughput ({dtype})")
    name = peak_of(rows[0]).name
    ax_mfu.set(xlabel="d_model", ylabel=f"{name} (%)", title=name)
    for ax in (ax_tok, ax_mfu):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["fp32", "bf16", "fp32+compile"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--budget-s", type=float, default=8.0, help="sweep: timed seconds per point (>= 3 steps)"
    )
    parser.add_argument("--set", action="append", default=[], help="config override for every measurement")
    parser.add_argument("--sweep", action="store_true", help="sweep d_model x block_size instead of modes")
    parser.add_argument("--d-models", type=int, nargs="+", default=[128, 256, 512, 768])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--table", type=Path, help="write the sweep as JSON lines here")
    parser.add_argument("--plot", type=Path, help="write the sweep plot (PNG) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(
            json.dumps(
                measure(
                    Path(spec["config"]), spec["overrides"], spec["steps"], spec["warmup"], spec["budget_s"]
                )
            )
        )
        return
    import torch

    print(
        f"{args.config.name}: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpus, "
        f"{torch.get_num_threads()} threads"
    )
    if args.sweep:
        rows = sweep(args)
        if args.table:
            args.table.parent.mkdir(parents=True, exist_ok=True)
            args.table.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if args.plot:
            plot(rows, args.plot, args.dtype)
        return
    results = {}
    for mode in args.modes:
        results[mode] = run_child(args.config, [*MODES[mode], *args.set], args.steps, args.warmup)
        print(line(mode, results[mode]), flush=True)
    if "fp32" in results:
        for mode, r in results.items():
            if mode != "fp32":
                print(f"{mode} / fp32 speed: {results['fp32']['ms_per_step'] / r['ms_per_step']:.2f}x")


if __name__ == "__main__":
    main()
