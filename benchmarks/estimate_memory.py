"""`lmforge estimate`'s memory model against the measured peak of a real training step on CPU.

Each configuration runs in a fresh process: the real training step (`Stepper`: forward,
backward, clip, AdamW) once to materialise the optimizer state, then once more under
`torch.profiler` with `profile_memory=True`. The measured peak is the bytes of live tensors
before that step (weights and optimizer state, counted from the tensors) plus the highest
running sum of the profiler's allocation and free events during it: tensor memory only,
free of allocator caching and RSS noise. The checkpointing runs use the
trainer's own `train.activation_checkpointing` mechanism (`apply_activation_checkpointing`)
to check that formula too. (Peak RSS is no good here: memory freed after the
first step stays in the allocator and is reused, so RSS barely moves.)

    .venv/bin/python benchmarks/estimate_memory.py                 # the default configurations, AC off and on
    .venv/bin/python benchmarks/estimate_memory.py --only tiny --json
    .venv/bin/python benchmarks/estimate_memory.py --only lora-fp32 lora-bf16 lora-int8 lora-nf4

The `lora-*` configurations train rank-8 adapters (`lora.rank`) on a frozen base held in fp32, bf16,
int8 or nf4 (`lora.base_dtype`), as the trainer does, against `lora_memory`'s estimate (the
fine-tuning table's LoRA columns).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "src" / "lmforge" / "recipes"  # the packaged recipes
SHAKESPEARE = RECIPES_DIR / "shakespeare-char.toml"
GELU = "model.mlp=gelu"  # the demo's MLP when RESULTS.md was measured (SwiGLU since, so that it exports)
# name: (config file, overrides); sizes span ~0.8M to ~60M parameters and three architectures
CONFIGS: dict[str, tuple[Path, list[str]]] = {
    "tiny": (SHAKESPEARE, ["model.vocab_size=65", GELU]),  # rope, rmsnorm, gelu, tied: 0.8M
    "small": (
        SHAKESPEARE,
        [
            "model.vocab_size=65",
            "model.n_layer=6",
            "model.n_head=6",
            "model.d_model=384",
            "model.block_size=256",
            "model.position=learned",
            "model.norm=layernorm",
            "model.bias=true",
            GELU,
            "train.batch_size=8",
        ],
    ),  # GPT-2 style: 10.7M
    "small-bf16": (
        SHAKESPEARE,
        [
            "model.vocab_size=65",
            "model.n_layer=6",
            "model.n_head=6",
            "model.d_model=384",
            "model.block_size=256",
            "model.position=learned",
            "model.norm=layernorm",
            "model.bias=true",
            GELU,
            "train.batch_size=8",
            "train.dtype=bf16",
        ],
    ),
    "medium": (
        SHAKESPEARE,
        [
            "model.vocab_size=8192",
            "model.n_layer=8",
            "model.n_head=12",
            "model.n_kv_head=4",
            "model.d_model=768",
            "model.block_size=256",
            "model.mlp=swiglu",
            "model.tie_embeddings=false",
            "train.batch_size=4",
        ],
    ),  # Llama style, GQA: 63M
}
# the LoRA test's model (tests/train/test_estimate_lora.py): Llama style, 2 x 256, 1.7M
LORA_MODEL = [
    "model.vocab_size=512",
    "model.n_layer=2",
    "model.n_head=4",
    "model.d_model=256",
    "model.block_size=64",
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "train.batch_size=4",
    "train.dtype=fp32",
    "lora.rank=8",
]
for base_dtype in ("fp32", "bf16", "int8", "nf4"):
    CONFIGS[f"lora-{base_dtype}"] = (SHAKESPEARE, [*LORA_MODEL, f"lora.base_dtype={base_dtype}"])


def measure(config_path: Path, overrides: list[str], checkpointing: bool) -> dict:
    """Peak tensor bytes of a steady-state training step, next to the estimate for it."""
    import numpy as np
    import torch

    from lmforge.config import load_config
    from lmforge.data.loader import RandomWindows
    from lmforge.model import GPT
    from lmforge.model.lora import apply_lora, lower_base_precision
    from lmforge.runtime import autocast, resolve_dtype
    from lmforge.train.distributed import apply_activation_checkpointing
    from lmforge.train.estimate import (
        count_lora,
        count_parameters,
        lora_memory,
        measured_step_peak,
        memory,
        resident_bytes,
    )
    from lmforge.train.optim import build_optimizers
    from lmforge.train.run import with_dtype
    from lmforge.train.step import Stepper, StepSettings

    config = load_config(config_path, [*overrides, "train.device=cpu"])
    device = torch.device("cpu")
    config = with_dtype(config, resolve_dtype(config.train.dtype, device))  # what the trainer would run
    train = dataclasses.replace(config.train, activation_checkpointing=checkpointing)
    config = dataclasses.replace(config, train=train)  # for lora_memory, which reads it there
    m, t = config.model, config.train
    torch.manual_seed(0)
    tokens = (
        np.random.default_rng(0)
        .integers(0, m.vocab_size, size=8 * m.block_size * t.batch_size)
        .astype(np.uint32)
    )
    batches = RandomWindows(tokens, m.block_size, t.batch_size, seed=0)
    model = GPT(m)
    lora = config.lora.rank > 0
    if lora:  # as the trainer: adapters, then the base in its precision, then checkpointing
        model = lower_base_precision(apply_lora(model, config.lora), config.lora.base_dtype)
    if checkpointing:  # what train.activation_checkpointing does: per block, non-reentrant
        apply_activation_checkpointing(model)
    optimizers = build_optimizers(model, config.optim)
    stepper = Stepper(
        model,
        optimizers,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        amp=autocast(device, t.dtype),
        device=device,
        settings=StepSettings(grad_accum_steps=t.grad_accum_steps, grad_clip=config.optim.grad_clip),
    )
    model.train()
    stepper.gradients(batches)  # a first step creates AdamW's moments
    stepper.update()
    baseline = resident_bytes(stepper)
    measured = measured_step_peak(stepper, batches)
    params = count_parameters(m)
    if lora:
        counts = count_lora(m, config.lora, params)
        est = lora_memory(config, params, counts, base_dtype=config.lora.base_dtype, cpu=True)
    else:
        est = memory(config, params, "none", devices=1, checkpointing=checkpointing, cpu=True)
    return {
        "params": params.total,
        "dtype": t.dtype,
        "checkpointing": checkpointing,
        "estimate": est.peak,
        "estimate_split": {
            k: getattr(est, k) for k in ("weights", "gradients", "optimizer", "activations", "buffers")
        },
        "measured": measured,
        "ratio": est.peak / measured,
        "baseline": baseline,
    }


def run_child(name: str, checkpointing: bool) -> dict:
    """`measure` in a fresh interpreter, so nothing of an earlier measurement is alive."""
    config, overrides = CONFIGS[name]
    spec = json.dumps({"config": str(config), "overrides": overrides, "checkpointing": checkpointing})
    result = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: measurement failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {"config": name, **row}


def machine_line() -> str:
    """The CPU, torch and the load average, for the record beside the figures."""
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="+", choices=sorted(CONFIGS), help="configurations to measure (default all)"
    )
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="skip the activation-checkpointing runs"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(Path(spec["config"]), spec["overrides"], spec["checkpointing"])))
        return
    mib = 2**20
    if not args.json:
        print(machine_line())
        print(
            f"{'config':<12}{'params':>12}{'dtype':>6}{'AC':>5}{'estimate MiB':>14}{'measured MiB':>14}"
            f"{'ratio':>7}"
        )
    for name in args.only or CONFIGS:
        for checkpointing in (False,) if args.no_checkpointing else (False, True):
            r = run_child(name, checkpointing)
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            print(
                f"{name:<12}{r['params']:>12,}{r['dtype']:>6}{'on' if checkpointing else 'off':>5}"
                f"{r['estimate'] / mib:14,.1f}{r['measured'] / mib:14,.1f}{r['ratio']:7.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
