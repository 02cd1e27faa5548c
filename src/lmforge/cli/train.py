"""`lmforge train`, `finetune` and `estimate`: a run from a config, and what it will cost."""

from __future__ import annotations

import argparse
import math
import os
import sys

from lmforge.cli.options import OUTPUT, Subparsers
from lmforge.errors import LmforgeError


def run_train(args: argparse.Namespace) -> int:
    import signal

    from lmforge.errors import TrainingInterrupted
    from lmforge.train.trainer import train_command

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for the job
    out = OUTPUT.build(args)
    if args.print_config:
        return _print_config(args, out.path)
    try:
        summary = train_command(
            args.config, args.set, out=out.path, resume=args.resume, overwrite=out.overwrite
        )
    except TrainingInterrupted as stop:
        if main_rank:
            print(f"lmforge train: {stop}", file=sys.stderr)
        return 128 + stop.signum if stop.signum in (signal.SIGINT, signal.SIGTERM) else 1
    if main_rank:
        print(summary.describe())
    return 0


def _print_config(args: argparse.Namespace, out: str | None) -> int:
    """--print-config: the config the run would use, as TOML that `lmforge train` reads back."""
    from lmforge.train.trainer import command_config

    config, path = command_config(args.config, args.set, out=out, resume=args.resume)
    overrides = "".join(f" --set {o}" for o in args.set)
    print(f"# resolved from {path or 'the defaults'}{overrides}")
    print(config.to_toml(), end="")
    return 0


def add_train(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help="train a model from a TOML config", description="Train a model.")
    _add_run_args(p)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    args.set = ["data.kind=sft", *args.set]  # the same loop as `train`, on prompt/completion data
    return run_train(args)


def add_finetune(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="fine-tune on prompt/completion JSONL (the train loop, prompt masked)",
        description="Fine-tune a model on DIR/train.jsonl, evaluating on DIR/val.jsonl "
        "(data.dir); start from a checkpoint with train.init_from.",
    )
    _add_run_args(p)
    return p


def _add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.n_layer=6 (repeatable)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        help="TOML config file, or a recipe name (`lmforge recipes` lists them) "
        "(default: RUN_DIR/config.toml with --resume, else the defaults)",
    )
    _add_set_option(p)
    OUTPUT.add(
        p,
        required=False,
        out_help="run folder (default runs/CONFIG_NAME)",
        overwrite_help="replace a run folder that lmforge wrote and start over",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe or file, defaults, --set) as TOML and exit",
    )


def run_estimate(args: argparse.Namespace) -> int:
    from lmforge.train.estimate import estimate_report

    devices = _parse_number(args.devices, "--devices", int)
    mfu = _parse_number(args.mfu, "--mfu", float)
    tokens = None if args.tokens is None else _parse_number(args.tokens, "--tokens", float)
    peak = None if args.peak_flops is None else _parse_number(args.peak_flops, "--peak-flops", float)
    seq_len = None if args.seq_len is None else _parse_number(args.seq_len, "--seq-len", int)
    options = dict(
        devices=devices,
        device_type=args.device_type,
        mfu=mfu,
        tokens=tokens,
        peak_flops=peak,
        seq_len=seq_len,
    )
    print(estimate_report(args.config, args.set, args.json, **options))
    return 0


def _parse_number(text: str, option: str, kind: type) -> float:
    """Option values checked here rather than by argparse, so a bad one is a one-line error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value) or (kind is int and not value.is_integer()):
        raise LmforgeError(f"{option} expects {'an integer' if kind is int else 'a number'}, got {text!r}")
    return kind(value)


def add_estimate(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="parameters, FLOPs, memory per device and training time of a config",
        description="Estimate a training run before starting it: exact parameter count, FLOPs "
        "per token, per-device memory for no parallelism / DDP / FSDP with and without "
        "activation checkpointing, the time for the token budget at a given MFU, and full fine-tuning "
        "against LoRA on an fp32, bf16, int8 or nf4 base.",
    )
    p.add_argument(
        "config",
        help="TOML config or recipe name (as for `lmforge train`), or a run or checkpoint folder to "
        "fine-tune (e.g. from `lmforge import`: its train.init_from)",
    )
    _add_set_option(p)
    p.add_argument("--devices", default="1", help="number of devices (default 1)")
    p.add_argument(
        "--device-type",
        default="cpu",
        metavar="{cpu,a100,h100,h200}",
        help="device kind for the peak FLOP/s (cpu: measured here; default cpu)",
    )
    p.add_argument("--mfu", default="0.4", help="model FLOPs utilisation in (0, 1] (default 0.4)")
    p.add_argument(
        "--tokens", help="token budget (default: max_steps x batch_size x grad_accum_steps x block_size)"
    )
    p.add_argument("--peak-flops", help="peak FLOP/s of one device, instead of the device type's")
    p.add_argument("--seq-len", help="tokens per training sequence (default: model.block_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p
