"""`lmforge export` and `import`: checkpoints to and from Hugging Face transformers folders."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lmforge.cli.options import MODEL_SOURCE, OUTPUT, Subparsers, positive_float
from lmforge.errors import LmforgeError


def shard_bytes(size_gb: float) -> int:
    """--max-shard-size-gb in bytes; NaN, infinities, zero and less than a byte are refused."""
    if not math.isfinite(size_gb) or size_gb * 10**9 < 1:
        raise LmforgeError(f"--max-shard-size-gb must be a positive number of GB, got {size_gb}")
    return int(size_gb * 10**9)


def run_export(args: argparse.Namespace) -> int:
    from lmforge.interop.hf import export_checkpoint

    out = OUTPUT.build(args)
    if args.adapter_only:
        from lmforge.interop.peft_adapter import export_adapter

        folder = export_adapter(Path(args.target), out.path, args.checkpoint, overwrite=out.overwrite)
        print(
            f"exported the LoRA adapters of {args.target} to {folder} "
            "(load with peft's PeftModel.from_pretrained onto the original model)"
        )
        return 0
    folder = export_checkpoint(
        Path(args.target),
        out.path,
        args.checkpoint,
        dtype=args.dtype,
        max_shard_bytes=shard_bytes(args.max_shard_size_gb),
        overwrite=out.overwrite,
    )
    print(
        f"exported {args.target} to {folder} (load with transformers' AutoModelForCausalLM.from_pretrained)"
    )
    return 0


def add_export(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="write a checkpoint as a Hugging Face transformers folder",
        description="Export a checkpoint as a standard transformers model folder (Llama, Qwen3 or GPT-2).",
    )
    MODEL_SOURCE.add(p, device=False)  # the weights are converted, not run
    OUTPUT.add(p)
    p.add_argument(
        "--max-shard-size-gb", type=positive_float, default=5.0, help="shard the weights above this size"
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run: write its adapters alone in PEFT's format (adapter_config.json and "
        "adapter_model.safetensors) instead of the merged model",
    )
    return p


def run_import(args: argparse.Namespace) -> int:
    from lmforge.interop.hf import import_folder

    out = OUTPUT.build(args)
    folder = import_folder(Path(args.hf_dir), out.path, out.overwrite)
    print(f'imported {args.hf_dir} into {folder} (sample, eval, or train with train.init_from = "{folder}")')
    return 0


def add_import(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="turn a local Hugging Face model folder into an lmforge run",
        description="Import a local transformers folder (Llama, Mistral, Qwen2, Qwen3, GPT-2).",
    )
    p.add_argument("hf_dir", help="a local folder with config.json, weights and tokenizer.json")
    OUTPUT.add(p, out_help="run folder to create")
    return p
