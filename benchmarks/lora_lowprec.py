"""LoRA on a low-precision frozen base (`lora.base_dtype` bf16, int8, nf4) against plain LoRA (fp32
base): peak memory of a training step, tokens/s and the loss curve of the same short fine-tune.

The model is Llama-shaped (GQA, SwiGLU, RMSNorm, RoPE; random weights from transformers, so nothing
is downloaded), imported with `lmforge import`, then fine-tuned with LoRA on TinyShakespeare
(byte-level tokens) by the real `lmforge train`, once per base precision, each in a fresh process:
the same seed, batches and adapters' initialisation. Tokens/s is the median of the logged steps after
the first; the loss curve is every step's. Peak memory is one steady training step's (after a first
that creates AdamW's moments), measured in another fresh process: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the bytes of live tensors before the step (a quantized
weight's inner tensors counted) plus the highest running sum of `torch.profiler`'s allocation events
during it (tensor memory only; RSS keeps what the allocator once held).

    .venv/bin/python benchmarks/lora_lowprec.py                      # CPU: d_model 256, 4 layers, 12 steps
    .venv/bin/python benchmarks/lora_lowprec.py --device cuda --d-model 2048 --n-layer 16 --steps 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_DTYPES = ("fp32", "bf16", "int8", "nf4")


def make_model(args: argparse.Namespace, root: Path) -> Path:
    """A random Llama-shaped transformers model with a byte-level tokenizer, imported into lmforge."""
    import torch
    import transformers

    from lmforge.data.tokenizer import byte_tokenizer
    from lmforge.interop.hf import import_folder

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.d_model,
        intermediate_size=args.d_model * 8 // 3 // 64 * 64,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.d_model // 64,
        num_key_value_heads=max(1, args.d_model // 256),
        max_position_embeddings=args.block_size,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    byte_tokenizer().save(str(root / "hf" / "tokenizer.json"))
    return import_folder(root / "hf", root / "imported")


def settings(args: argparse.Namespace, imported: Path, data: Path, base_dtype: str) -> list[str]:
    return [
        f"data.dir={data}",
        f"train.init_from={imported}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_interval={args.steps}",
        f"train.checkpoint_interval={args.steps}",
        "train.eval_batch_size=8",
        f"train.device={args.device}",
        f"train.dtype={args.dtype}",
        "log.interval=1",
        "log.progress=false",
        "optim.lr=1e-3",
        "optim.weight_decay=0.0",
        "schedule.warmup_steps=5",
        "lora.rank=16",
        "lora.alpha=32",
        f"lora.base_dtype={base_dtype}",
    ]


def train(args: argparse.Namespace, root: Path, imported: Path, data: Path, base_dtype: str) -> dict:
    """The real `lmforge train`, in its own process: the loss per step and tokens/s."""
    run = root / f"run-{base_dtype}"
    overrides = sum((["--set", s] for s in settings(args, imported, data, base_dtype)), [])
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", "--out", str(run), *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    if result.returncode != 0:
        raise SystemExit(f"{base_dtype}: training failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in lines if "loss" in e]
    return {
        "loss": [e["loss"] for e in steps],
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in steps[1:]),
        "val_loss": [e["val_loss"] for e in lines if "val_loss" in e][-1],
    }


def peak_memory(spec: dict) -> dict:
    """One steady training step of the run's model (built as `lmforge train` builds it): peak bytes."""
    import numpy as np
    import torch

    from lmforge.checkpoint import init_model_config, resolve_checkpoint
    from lmforge.config import load_config
    from lmforge.data.loader import RandomWindows
    from lmforge.runtime import autocast, resolve_device, resolve_dtype
    from lmforge.train.estimate import measured_step_peak, tensor_bytes
    from lmforge.train.optim import build_optimizers
    from lmforge.train.run import build_model, with_dtype
    from lmforge.train.step import Stepper, StepSettings

    config = load_config(None, spec["settings"])
    device = resolve_device(config.train.device)
    config = with_dtype(config, resolve_dtype(config.train.dtype, device))
    source = resolve_checkpoint(Path(config.train.init_from), "best")  # the imported architecture
    config = dataclasses.replace(config, model=init_model_config(source, config.model))
    t = config.train
    model = build_model(config, Path(config.train.init_from), device)
    # the imported model's architecture; sequences of the run's length
    block = spec["block_size"]
    tokens = np.random.default_rng(0).integers(0, 256, size=8 * block * t.batch_size).astype(np.uint32)
    batches = RandomWindows(tokens, block, t.batch_size, seed=0)
    optimizers = build_optimizers(model, config.optim)
    stepper = Stepper(
        model,
        optimizers,
        scaler=torch.amp.GradScaler(device.type, enabled=False),
        amp=autocast(device, t.dtype),
        device=device,
        settings=StepSettings(grad_accum_steps=1, grad_clip=config.optim.grad_clip),
    )
    model.train()
    stepper.gradients(batches)
    stepper.update()
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stepper.gradients(batches)
        stepper.update()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "weights": weights}
    return {"peak": measured_step_peak(stepper, batches), "weights": weights}


def measure_memory(args: argparse.Namespace, imported: Path, data: Path, base_dtype: str) -> dict:
    spec = {"settings": settings(args, imported, data, base_dtype), "block_size": args.block_size}
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    if result.returncode != 0:
        raise SystemExit(f"{base_dtype}: memory measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda (default cpu)")
    parser.add_argument("--dtype", default="auto", help="train.dtype (default auto)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", nargs="+", choices=BASE_DTYPES, default=list(BASE_DTYPES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peak_memory(json.loads(args.child))))
        return
    sys.path.insert(0, str(REPO / "src"))
    from lmforge.data.prepare import prepare

    data_root = Path(os.environ.get("LMFORGE_DATA_DIR", REPO.parent / "shared" / "data"))
    text = data_root / "tinyshakespeare" / "input.txt"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        imported = make_model(args, root)
        (root / "text.txt").write_text(text.read_text()[:100_000])
        prepare(str(root / "text.txt"), root / "data", tokenizer="byte", progress=False)
        for base_dtype in args.only:
            rows[base_dtype] = {
                **train(args, root, imported, root / "data", base_dtype),
                **measure_memory(args, imported, root / "data", base_dtype),
            }
    report(args, rows)


def report(args: argparse.Namespace, rows: dict) -> None:
    if args.json:
        print(json.dumps({"args": vars(args), "machine": platform.processor(), "rows": rows}))
        return
    print(
        f"Llama-shaped, d_model {args.d_model}, {args.n_layer} layers; LoRA rank 16 on every block "
        f"matrix; {args.steps} steps of {args.batch_size} x {args.block_size} tokens on {args.device}, "
        f"train.dtype {args.dtype}"
    )
    header = ("base", "peak memory", "weights", "tokens/s", "first loss", "last loss", "val loss")
    print(f"{header[0]:<6}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, r in rows.items():
        mib = [f"{r[k] / 2**20:.1f} MiB" for k in ("peak", "weights")]
        print(
            f"{name:<6}{mib[0]:>12}{mib[1]:>12}{r['tokens_per_s']:>12,.0f}"
            f"{r['loss'][0]:>12.4f}{r['loss'][-1]:>12.4f}{r['val_loss']:>12.4f}"
        )
    print("loss curves (every 5th step):")
    for name, r in rows.items():
        print(f"  {name:<5} " + " ".join(f"{x:.3f}" for x in r["loss"][::5]))


if __name__ == "__main__":
    main()
