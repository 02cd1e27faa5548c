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
        description="Export a checkpoint as a standard transformers model folder (Llama, Qwen2, Qwen3, "
        "Mistral or GPT-2).",
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
    from lmforge.interop.hub import cached_snapshot, is_repo_id

    out = OUTPUT.build(args)
    source = args.hf_dir
    if is_repo_id(source):  # through the local Hub cache only: offline, never a download
        folder = cached_snapshot(source, args.revision)
    elif args.revision is not None:
        raise LmforgeError(f"--revision is for a repo id (ORG/NAME), not the folder {source}")
    else:
        folder = Path(source)
    run = import_folder(folder, out.path, out.overwrite)
    origin = source if folder == Path(source) else f"{source} ({folder})"  # a repo id: its snapshot too
    print(f'imported {origin} into {run} (sample, eval, or train with train.init_from = "{run}")')
    return 0


def add_import(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="turn a Hugging Face model (a local folder or a downloaded repo id) into an lmforge run",
        description="Import a transformers model: Llama 3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3, Phi-3 or "
        "GPT-2, from a local folder, a Hub cache snapshot, or a repo id already in the local Hub cache.",
    )
    p.add_argument(
        "hf_dir",
        metavar="SOURCE",
        help="a folder with config.json, safetensors weights and tokenizer.json, or a repo id ORG/NAME "
        "fetched by `lmforge download` (read from the local Hub cache, offline)",
    )
    p.add_argument(
        "--revision", help="with a repo id: the branch, tag or commit in the cache (default: main)"
    )
    OUTPUT.add(p, out_help="run folder to create")
    return p


def run_download(args: argparse.Namespace) -> int:
    from lmforge.interop.hub import download

    if args.out == "":  # not the working folder by accident
        raise LmforgeError("--out is empty: give a folder")
    result = download(args.repo_id, args.revision, out=Path(args.out) if args.out else None)
    files = f"{len(result.files)} files"
    print(
        f"downloaded {result.repo_id} at commit {result.commit} ({files}) to {result.folder}"
        f" (then: lmforge import {args.out or result.repo_id} --out RUN)"
    )
    return 0


def add_download(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="fetch a model's weights, configs and tokenizer from the Hugging Face Hub",
        description="Download what lmforge reads of a Hub model repository (safetensors, config.json, "
        "generation_config.json, tokenizer files). Resumes an interrupted download; a gated model "
        "needs HF_TOKEN.",
    )
    p.add_argument("repo_id", help="the repository, ORG/NAME (e.g. HuggingFaceTB/SmolLM2-135M)")
    p.add_argument(
        "--revision", help="a branch, tag or commit (default: main); the commit fetched is printed"
    )
    p.add_argument(
        "--out",
        help="a folder to put the files in, with lmforge-download.json naming the commit "
        "(default: the Hugging Face cache, which `lmforge import ORG/NAME` reads)",
    )
    return p
