"""Peak memory and step time of one training step with and without activation checkpointing.

Each mode runs in a fresh process, which builds the model, optimizer and a batch, runs one
warm-up step (so optimizer state and allocator pools exist), then measures further steps
of the real training step (`lmforge.train.step.Stepper`). Peak memory is what the step
adds on top of that steady state: on CUDA `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats`; on CPU the growth of the process's peak resident set
(`ru_maxrss`) over its resident set before the measured steps, with warm-up steps run at
a smaller batch so they do not set the peak themselves.

    .venv/bin/python benchmarks/activation_checkpointing.py   # 8 layers, d 384, 8 x 256 tokens
    .venv/bin/python benchmarks/activation_checkpointing.py --n-layer 12 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    import contextlib

    import torch

    from lmforge.config import ModelConfig, OptimConfig
    from lmforge.model import GPT
    from lmforge.runtime import resolve_device, synchronize
    from lmforge.train.distributed import apply_activation_checkpointing
    from lmforge.train.optim import build_optimizers
    from lmforge.train.step import Stepper, StepSettings

    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        block_size=args.block_size,
        vocab_size=args.vocab_size,
    )
    model = GPT(config).to(device)
    if checkpointing:
        apply_activation_checkpointing(model)
    optimizers = build_optimizers(model, OptimConfig())
    stepper = Stepper(
        model,
        optimizers,
        scaler=torch.amp.GradScaler(device.type, enabled=False),
        amp=contextlib.nullcontext(),
        device=device,
        settings=StepSettings(grad_accum_steps=1, grad_clip=1.0),
    )

    def batches(rows: int):
        while True:
            x = torch.randint(0, args.vocab_size, (rows, args.block_size))
            yield x, x.roll(-1, dims=1)

    def step(rows: int) -> float:
        start = time.perf_counter()
        stepper.gradients(batches(rows))
        stepper.update()
        synchronize(device)
        return time.perf_counter() - start

    step(1)  # warm-up at one row: optimizer state and pools exist, the activation peak is still ahead
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes()
    times = [step(args.batch_size) for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        )  # ru_maxrss is in KiB on Linux
    return {
        "activation_checkpointing": checkpointing,
        "peak_step_bytes": peak,
        "step_s": min(times),
        "params": model.num_params(),
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per mode (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child == "on")))
        return
    print(
        f"{args.n_layer} layers, d_model {args.d_model}, "
        f"{args.batch_size} x {args.block_size} tokens per step, "
        f"fp32, {args.device}; {platform.processor() or platform.machine()}"
    )
    results = {}
    for mode in ("off", "on"):
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", mode],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = r = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"activation checkpointing {mode:3}: "
            f"peak memory of a step {r['peak_step_bytes'] / 2**20:8.1f} MiB, "
            f"{r['step_s'] * 1000:7.0f} ms/step ({r['params']:,} parameters)"
        )
    off, on = results["off"], results["on"]
    print(
        f"saving: {(off['peak_step_bytes'] - on['peak_step_bytes']) / 2**20:.1f} MiB "
        f"({1 - on['peak_step_bytes'] / off['peak_step_bytes']:.0%} of the step's peak); "
        f"time x{on['step_s'] / off['step_s']:.2f}"
    )


if __name__ == "__main__":
    main()
