"""`lmforge VERB ...`: one command line for every stage of the pipeline.

Each verb is a function taking parsed arguments; errors the user can fix are raised as
`LmforgeError` and printed here as one line with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lmforge import __version__
from lmforge.config import DTYPE_NAMES, SEED_LIMIT
from lmforge.errors import LmforgeError
from lmforge.output import command_output
from lmforge.report import SORT_KEYS, X_AXES
from lmforge.tasks import DEFAULT_VAL_FRACTION, TASKS, tasks_with_datasets

if TYPE_CHECKING:
    from lmforge.inference import ModelSource

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
OVERWRITE_HELP = "replace an --out folder that lmforge wrote, of the same kind (never its input, . or ~)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed every random generator takes, [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (float() alone accepts nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < math.inf:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as the usage of the verb at fault, then exactly one line `PROG: error: MESSAGE`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _prepare(args: argparse.Namespace) -> int:
    from lmforge.data.canaries import check_spec
    from lmforge.data.pii import parse_kinds
    from lmforge.data.prepare import prepare
    from lmforge.data.tokenizer import BUILTIN_KINDS

    tokenizer = args.tokenizer
    # a data, run or checkpoint folder: encode with its tokenizer (a folder named "bpe" does not count)
    if tokenizer not in BUILTIN_KINDS and Path(tokenizer).is_dir():
        from lmforge.checkpoint import tokenizer_file_of

        tokenizer = str(tokenizer_file_of(Path(tokenizer)))
    report = prepare(
        args.input,
        out=args.out,
        tokenizer=tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        invalid_utf8=args.invalid_utf8,
        progress=not args.quiet,
        unknown_chars=args.unknown_chars,
        scrub_pii=parse_kinds(args.scrub_pii),
        canaries=check_spec(args.canaries, args.canary_repeats, args.seed),
        holdout_lines=args.holdout_lines,
    )
    print(report.summary, file=sys.stderr)  # the result, on stderr as always, even under -q
    return 0


def _add_prepare(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "prepare",
        help="tokenize a text file, folder or named dataset into token shards",
        description="Tokenize INPUT into OUT/train.bin, OUT/val.bin, OUT/tokenizer.json and OUT/meta.json.",
    )
    p.add_argument(
        "input",
        help="a text file, a folder (.txt/.md/.raw/.jsonl, recursive) or a dataset name "
        "(tinyshakespeare, gutenberg, wikitext-2)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="{char,byte,bpe,PATH}",
        help="a built-in kind, a tokenizer.json, or a data, run or checkpoint folder (its tokenizer)",
    )
    p.add_argument("--vocab-size", type=positive_int, default=None, help="BPE vocabulary size (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out (default 0.1)")
    p.add_argument("--seed", type=seed, default=0, help="seed for the choice of validation documents")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--invalid-utf8",
        choices=("error", "replace"),
        default="error",
        help="what to do with bytes that are not UTF-8: stop with an error (default) or replace with U+FFFD",
    )
    p.add_argument(
        "--unknown-chars",
        choices=("error", "replace", "skip"),
        default="error",
        help="text a tokenizer.json cannot represent: stop with an error (default), replace it with the "
        "tokenizer's unknown token, or skip it; a count goes to stderr",
    )
    _add_privacy_args(p)
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="as `lmforge -q`: no progress bars or messages; the summary line still prints",
    )
    p.set_defaults(run=_prepare)


def _add_privacy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scrub-pii",
        nargs="?",
        const="all",
        metavar="KINDS",
        help="replace personal data with placeholders before tokenizing: all (the default KINDS) or a "
        "comma-separated list of url, email, iban, card, ip, phone; counts go to meta.json",
    )
    p.add_argument(
        "--canaries",
        type=int,
        metavar="N",
        help="insert N random secrets ('my PIN is 4 8 1 9 0 2') per repeat count into the train split, "
        "saved to OUT/canaries.json for `lmforge audit`",
    )
    p.add_argument(
        "--canary-repeats",
        metavar="R1,R2,...",
        help="how many times each group of canaries is inserted (default 1,4,16; 0: never, a control)",
    )
    p.add_argument(
        "--holdout-lines",
        type=int,
        metavar="N",
        help="take about N random lines out of the train text and mark about N others as members, both "
        "saved to OUT/membership.json: `lmforge audit`'s membership inference compares the two",
    )


def _train(args: argparse.Namespace) -> int:
    import signal

    from lmforge.errors import TrainingInterrupted
    from lmforge.train.trainer import train_command

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for the job
    try:
        summary = train_command(args.config, args.set, args.out, args.resume, args.overwrite)
    except TrainingInterrupted as stop:
        if main_rank:
            print(f"lmforge train: {stop}", file=sys.stderr)
        return 128 + stop.signum if stop.signum in (signal.SIGINT, signal.SIGTERM) else 1
    if main_rank:
        print(summary.describe())
    return 0


def _finetune(args: argparse.Namespace) -> int:
    args.set = ["data.kind=sft", *args.set]  # the same loop as `train`, on prompt/completion data
    return _train(args)


def _add_finetune(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune",
        help="fine-tune on prompt/completion JSONL (the train loop, prompt masked)",
        description="Fine-tune a model on DIR/train.jsonl, evaluating on DIR/val.jsonl "
        "(data.dir); start from a checkpoint with train.init_from.",
    )
    _add_run_args(p)
    p.set_defaults(run=_finetune)


def _tasks_prepare(args: argparse.Namespace) -> int:
    from lmforge.tasks import CorpusSource, prepare_task

    if args.examples is not None and args.corpus is None:
        raise LmforgeError("--examples needs --from (both apply to tasks made from a corpus)")
    prepared = prepare_task(
        args.task,
        Path(args.out),
        Path(args.data_dir) if args.data_dir else None,
        overwrite=args.overwrite,
        val_fraction=args.val_fraction,
        seed=args.seed,
        corpus=CorpusSource(args.corpus, args.examples) if args.corpus else None,
    )
    print(prepared.summary(args.task, args.out))
    return 0


def _add_tasks(verbs: argparse._SubParsersAction) -> None:
    with_datasets = tasks_with_datasets()
    p = verbs.add_parser("tasks", help=f"task datasets ({', '.join(with_datasets)}) as JSONL for finetune")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser(
        "prepare",
        help="write a task's train/val/eval JSONL files",
        description="Convert a shared task dataset into prompt/completion JSONL files: train.jsonl, "
        "val.jsonl (checkpoint selection: the dataset's validation split, else carved from train) and "
        "eval.jsonl (the scored split, read only by `lmforge eval --task`).",
    )
    q.add_argument("task", choices=with_datasets)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of train carved out as val.jsonl when the dataset has no validation split "
        f"(default {DEFAULT_VAL_FRACTION})",
    )
    q.add_argument("--seed", type=seed, default=0, help="seed for the choice of val examples")
    q.add_argument(
        "--from",
        dest="corpus",
        metavar="CORPUS",
        help="cloze: the text to make questions from (a dataset name, a text file or a folder)",
    )
    q.add_argument(
        "--examples",
        type=positive_int,
        help="cloze: at most N examples over train, val and eval (default 20000), a seeded uniform sample",
    )
    q.add_argument("--data-dir", help="folder of the shared datasets (default $LMFORGE_DATA_DIR)")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.set_defaults(run=_tasks_prepare)


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
        help="TOML config (default: RUN_DIR/config.toml with --resume, else the defaults)",
    )
    _add_set_option(p)
    p.add_argument("--out", help="run folder (default runs/CONFIG_NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a run folder that lmforge wrote and start over"
    )


def _add_train(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("train", help="train a model from a TOML config", description="Train a model.")
    _add_run_args(p)
    p.set_defaults(run=_train)


def _estimate(args: argparse.Namespace) -> int:
    from lmforge.train.estimate import estimate_report

    devices = _parse_number(args.devices, "--devices", int)
    mfu = _parse_number(args.mfu, "--mfu", float)
    tokens = None if args.tokens is None else _parse_number(args.tokens, "--tokens", float)
    peak = None if args.peak_flops is None else _parse_number(args.peak_flops, "--peak-flops", float)
    options = dict(devices=devices, device_type=args.device_type, mfu=mfu, tokens=tokens, peak_flops=peak)
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


def _add_estimate(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "estimate",
        help="parameters, FLOPs, memory per device and training time of a config",
        description="Estimate a training run before starting it: exact parameter count, FLOPs "
        "per token, per-device memory for no parallelism / DDP / FSDP with and without "
        "activation checkpointing, and the time for the token budget at a given MFU.",
    )
    p.add_argument("config", help="TOML config (as for `lmforge train`)")
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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_estimate)


def _eval(args: argparse.Namespace) -> int:
    from lmforge.eval.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        _model_source(args),
        task=args.task,
        data=Path(args.data) if args.data else None,
        batch_size=args.batch_size,
        limit=args.limit,
        beam_size=args.beam_size,
        max_new_tokens=args.max_new_tokens,
        predictions=Path(args.predictions) if args.predictions else None,
        calibrate=args.calibrate,
    )
    print(report.json_line() if args.json else report.text())
    return 0


def _add_checkpoint_args(
    p: argparse.ArgumentParser, threads_default: str = "PyTorch's: one per core"
) -> None:
    """TARGET and --checkpoint, --device, --dtype, --threads: which model to load, how it runs
    (`_model_source` turns them into one value)."""
    p.add_argument("target", help="a run folder or a checkpoint folder")
    p.add_argument(
        "--checkpoint", default="best", help="best (lowest val loss), last, or a checkpoint folder"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument(
        "--threads",
        type=positive_int,
        help=f"CPU threads for the model's operations (default: {threads_default}); a small model "
        "decodes as fast or faster on fewer",
    )


def _model_source(args: argparse.Namespace) -> ModelSource:
    """The checkpoint that `_add_checkpoint_args`' options name, as one value."""
    from lmforge.inference import ModelSource

    return ModelSource(Path(args.target), args.checkpoint, args.device, args.dtype)


def _add_eval(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "eval",
        help="loss/perplexity/bits per byte, or task metrics (accuracy, BLEU, EM/F1, ROUGE)",
        description="Evaluate a checkpoint over the whole val split of prepared data, "
        "or on a task's eval.jsonl with --task.",
    )
    _add_checkpoint_args(p)
    p.add_argument(
        "--task",
        default="lm",
        choices=("lm", *TASKS),
        help="lm: loss/ppl/bpb on prepared data; others: task metrics on DATA/eval.jsonl",
    )
    p.add_argument("--data", help="prepared data folder, or a task folder (default: the run's data.dir)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, help="tasks: evaluate only the first N examples")
    p.add_argument("--beam-size", type=positive_int, default=1, help="tasks that decode: 1 is greedy")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="tasks that decode: answer length cap (default 64, at most half the block size)",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="tasks: write one JSON line per example (id, prompt, reference(s), prediction, score) to FILE",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="sst2: score each label by its log-probability minus that after a content-free review "
        "(N/A), which removes the model's prior for a label (for zero-shot use)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_eval)


def _sample(args: argparse.Namespace) -> int:
    from lmforge.inference.sample import stream_samples

    for piece in stream_samples(
        _model_source(args),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()  # stream the text as it comes
    return 0


def _add_sample(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "sample",
        help="generate text from a checkpoint",
        description="Generate text autoregressively with a KV cache, streaming it as it comes.",
    )
    _add_checkpoint_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=positive_int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=seed, default=1337)
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.set_defaults(run=_sample)


def _chat(args: argparse.Namespace) -> int:
    from lmforge.chat.repl import start_chat

    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
    )
    chat = start_chat(_model_source(args), system=args.system, options=options, seed=args.seed)
    chat.run()
    return 0


def _add_chat(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "chat",
        help="talk to a model in the terminal, with its chat template",
        description="A terminal chat: each message is rendered with the checkpoint's chat template "
        "(or lmforge's default) and the reply streamed as it is generated. Commands: /reset, "
        "/system TEXT, /temperature X, /quit.",
    )
    _add_checkpoint_args(p)
    p.add_argument("--system", default="", help="a system message to start with")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="reply length cap (default: half the context, at most 256)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=seed, default=1337)
    p.set_defaults(run=_chat)


API_KEY_ENV = "LMFORGE_API_KEY"  # serve's API key when --api-key is not given


def _serve(args: argparse.Namespace) -> int:
    api_key = _api_key(args.api_key)
    try:
        import uvicorn

        from lmforge.serve.api import LOOPBACK_HOSTS, create_app
    except ImportError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise LmforgeError(
            f"serve needs the serve extra ({exc.name} is missing): pip install 'lmforge[serve]'"
        ) from None
    from lmforge.serve.worker import default_threads

    # the engine's process loads the weights; this one needs the tokenizer and configuration only
    session = _model_source(args).load(weights=False)
    name = args.model_name or Path(args.target).resolve().name
    app = create_app(
        session,
        name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=api_key,
        host=args.host,
        engine_process=True,
        threads=args.threads or default_threads(),
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {session.checkpoint} as {name!r} at http://{host}:{args.port}/ (playground) and "
        f"http://{host}:{args.port}/v1 (OpenAI API); Ctrl-C stops",
        flush=True,
    )
    if api_key is None and args.host not in LOOPBACK_HOSTS:
        print("warning: reachable beyond this machine without --api-key", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _api_key(given: str | None) -> str | None:
    """serve's API key: --api-key, else $LMFORGE_API_KEY (not shown by `ps`), else none; never empty."""
    key, source = (given, "--api-key") if given is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is not None and not key.strip():
        raise LmforgeError(f"{source} is empty: give a key, or leave it out to serve without one")
    return key


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def _add_serve(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with batched decoding, and a web playground",
        description="Serve a checkpoint over HTTP: GET /v1/models, POST /v1/completions and "
        "/v1/chat/completions (OpenAI's API, streamed with stream: true), and a chat playground at /. "
        "Concurrent requests decode together in one batched KV cache.",
    )
    _add_checkpoint_args(p, threads_default="one per core but one, which the HTTP side gets")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}, else no key; "
        "the environment keeps it out of `ps`)",
    )
    p.add_argument("--model-name", help="the model's id in the API (default: the run folder's name)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests waiting for a slot before more are refused with 503 (default 64)",
    )
    p.set_defaults(run=_serve)


def _audit(args: argparse.Namespace) -> int:
    from lmforge.eval.audit import AuditOptions, audit_checkpoint

    options = AuditOptions(
        alternatives=args.alternatives,
        prefixes=args.prefixes,
        prefix_tokens=args.prefix_tokens,
        k=args.k,
        sequences=args.sequences,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    report = audit_checkpoint(
        _model_source(args),
        Path(args.data) if args.data else None,
        Path(args.canaries) if args.canaries else None,
        options=options,
    )
    print(report.json_line() if args.json else report.text())
    return 0


def _add_audit(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "audit",
        help="leakage audit: canary exposure, verbatim memorisation, membership inference AUC",
        description="Measure what a checkpoint gives away about its training data: the exposure of "
        "the canaries `prepare --canaries` inserted, by repeat count; the share of train vs val prefixes "
        "whose greedy continuation is verbatim; the AUC of membership inference by loss between the "
        "member and held-out lines of `prepare --holdout-lines`.",
    )
    _add_checkpoint_args(p)
    p.add_argument("--data", help="prepared data folder (default: the run's data.dir)")
    p.add_argument("--canaries", help="canaries.json (default: DATA/canaries.json, if there)")
    p.add_argument(
        "--alternatives", type=positive_int, default=10_000, help="random secrets each canary is ranked among"
    )
    p.add_argument("--prefixes", type=positive_int, default=256, help="memorisation: prefixes per split")
    p.add_argument(
        "--prefix-tokens",
        type=positive_int,
        help="memorisation: prefix length (default 64, or what fits in the block size beside --k)",
    )
    p.add_argument(
        "--k",
        type=positive_int,
        help="memorisation: tokens to reproduce (default 32, at most half the block size)",
    )
    p.add_argument(
        "--sequences",
        type=positive_int,
        default=512,
        help="membership: member lines, and as many held-out ones, from DATA/membership.json (default 512)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=seed, default=0, help="seed for the alternatives and windows drawn")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_audit)


def _inspect(args: argparse.Namespace) -> int:
    from lmforge.eval.inspect import inspect_checkpoint

    report = inspect_checkpoint(
        _model_source(args),
        prompt=args.prompt,
        out=Path(args.out),
        top_k=args.top_k,
        overwrite=args.overwrite,
    )
    print(report.describe())
    return 0


def _add_inspect(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "inspect",
        help="attention maps, logit lens, per-token surprisal and top-k of a prompt",
        description="Run PROMPT through a checkpoint once and write to OUT: attention_layer{i}.png "
        "(every head), logit_lens.png/.tsv (each layer's prediction through the final norm and head), "
        "surprisal.html (per-token loss), topk.json and summary.json.",
    )
    _add_checkpoint_args(p)
    p.add_argument("--prompt", required=True, help="the text to inspect (at most block_size tokens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--top-k", type=positive_int, default=5, help="next tokens listed per position (default 5)"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_inspect)


def _compare(args: argparse.Namespace) -> int:
    if args.tally:
        if args.runs or args.prompts or args.out:
            args.parser.error("--tally DIR JUDGMENTS takes no runs, --prompts or --out")
        from lmforge.eval.compare import tally

        result = tally(Path(args.tally[0]), Path(args.tally[1]))
        print(json.dumps(result.as_dict(), ensure_ascii=False) if args.json else result.text())
        return 0
    if len(args.runs) != 2 or not args.prompts or not args.out:
        args.parser.error("give two runs, --prompts FILE and --out DIR (or --tally DIR JUDGMENTS)")
    from lmforge.eval.compare import make_sheet
    from lmforge.inference import ModelSource
    from lmforge.inference.sampling import SamplingOptions

    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    a, b = (ModelSource(Path(run), args.checkpoint, args.device, args.dtype) for run in args.runs)
    report = make_sheet(
        (a, b),
        Path(args.prompts),
        Path(args.out),
        options=options,
        seed=args.seed,
        chat=args.chat,
        overwrite=args.overwrite,
    )
    print(report.describe())
    return 0


def _add_compare(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "compare",
        help="blind side-by-side human evaluation of two runs: an HTML sheet, then a tally",
        description="Have RUN_A and RUN_B answer every prompt of --prompts and write OUT/sheet.html "
        "(the two answers per prompt as A and B in a shuffled order; the judge clicks A, B or tie and "
        "downloads judgments.json) and OUT/key.json (which run is which side). "
        "`--tally OUT JUDGMENTS.json` un-blinds the judgments: wins, win rate with a 95%% Wilson "
        "interval, and the exact sign test.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="RUN_A and RUN_B: run or checkpoint folders")
    p.add_argument(
        "--prompts", metavar="FILE", help='one prompt per line, or .jsonl with a "prompt" per line'
    )
    p.add_argument("--out", metavar="DIR", help="folder for sheet.html and key.json")
    p.add_argument(
        "--tally", nargs=2, metavar=("DIR", "JUDGMENTS"), help="un-blind a downloaded judgments.json"
    )
    p.add_argument("--json", action="store_true", help="--tally: print one JSON object")
    p.add_argument(
        "--checkpoint", default="best", help="best (lowest val loss), last, or a checkpoint folder"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through each "
        "run's chat template (default: continue the prompt as text)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="answer length cap (default 128; with --chat at most half the smaller context)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument(
        "--seed",
        type=seed,
        default=1337,
        help="seed of the sides' shuffle; prompt i is sampled with seed + i by both runs",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_compare)


def shard_bytes(size_gb: float) -> int:
    """--max-shard-size-gb in bytes; NaN, infinities, zero and less than a byte are refused."""
    if not math.isfinite(size_gb) or size_gb * 10**9 < 1:
        raise LmforgeError(f"--max-shard-size-gb must be a positive number of GB, got {size_gb}")
    return int(size_gb * 10**9)


def _export(args: argparse.Namespace) -> int:
    from lmforge.interop.hf import export_checkpoint

    out = export_checkpoint(
        Path(args.target),
        Path(args.out),
        args.checkpoint,
        dtype=args.dtype,
        max_shard_bytes=shard_bytes(args.max_shard_size_gb),
        overwrite=args.overwrite,
    )
    print(f"exported {args.target} to {out} (load with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0


def _add_export(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face transformers folder",
        description="Export a checkpoint as a standard transformers model folder (Llama, Qwen3 or GPT-2).",
    )
    p.add_argument("target", help="a run folder or a checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--checkpoint", default="best", help="best (lowest val loss), last, or a checkpoint folder"
    )
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument(
        "--max-shard-size-gb", type=positive_float, default=5.0, help="shard the weights above this size"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_export)


def _import(args: argparse.Namespace) -> int:
    from lmforge.interop.hf import import_folder

    out = import_folder(Path(args.hf_dir), Path(args.out), args.overwrite)
    print(f'imported {args.hf_dir} into {out} (sample, eval, or train with train.init_from = "{out}")')
    return 0


def _add_import(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "import",
        help="turn a local Hugging Face model folder into an lmforge run",
        description="Import a local transformers folder (Llama, Mistral, Qwen2, Qwen3, GPT-2).",
    )
    p.add_argument("hf_dir", help="a local folder with config.json, weights and tokenizer.json")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_import)


def _plot(args: argparse.Namespace) -> int:
    from lmforge.report.plot import save_plot

    out = save_plot([Path(run) for run in args.runs], Path(args.out), args.x)
    print(f"plotted {len(args.runs)} run{'s' if len(args.runs) > 1 else ''} -> {out}")
    return 0


def _add_plot(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "plot",
        help="loss, val loss, learning rate, grad norm and tokens/s of runs, overlaid",
        description="Draw the curves of one or more runs from their metrics.jsonl into one picture: "
        "train and val loss and grad norm (log scale), learning rate and tokens/s.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", required=True, help="the picture: FILE.png (or .svg, .pdf, ...)")
    p.add_argument("--x", default="step", choices=X_AXES, help="the x axis (default step)")
    p.set_defaults(run=_plot)


def _runs(args: argparse.Namespace) -> int:
    from lmforge.report.runs import runs_report

    print(runs_report(Path(args.dir), args.sort, args.json))
    return 0


def _add_runs(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "runs",
        help="one line per run folder: steps, best val loss, tokens, wall time, status",
        description="List the run folders in DIR (or DIR itself): steps done/planned, best val loss, "
        "tokens, wall time and status (finished, interrupted, or running while a process holds its lock).",
    )
    p.add_argument("dir", nargs="?", default="runs", help="a folder of runs, or a run folder (default runs)")
    p.add_argument("--sort", default="name", choices=SORT_KEYS, help="order (default name)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=_runs)


VERBS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_prepare,
    _add_train,
    _add_finetune,
    _add_estimate,
    _add_eval,
    _add_sample,
    _add_chat,
    _add_serve,
    _add_audit,
    _add_inspect,
    _add_compare,
    _add_export,
    _add_import,
    _add_tasks,
    _add_plot,
    _add_runs,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Train and optimize GPT-style language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    _add_verbosity(parser)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verb in VERBS:
        add_verb(verbs)
    _remember_parsers(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-q/-v before the verb: how much of the `lmforge` logger's output reaches the terminal. Their own
    dest, so that a verb's `-q` (prepare's) does not overwrite it with its default."""
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const=logging.WARNING,
        default=logging.INFO,
        help="warnings and errors only: no progress or messages (results still print)",
    )
    verbosity.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const=logging.DEBUG,
        help="debug messages too",
    )


def _log_level(args: argparse.Namespace) -> int:
    """The level of the global -q/-v; `prepare -q` is the global -q."""
    return logging.WARNING if getattr(args, "quiet", False) else args.log_level


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command records its own parser in the namespace; the innermost one parsed wins."""
    parser.set_defaults(parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _remember_parsers(sub)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; arguments nobody knows are reported by the verb they were given to
    (argparse alone reports them with the top-level usage)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with command_output(_log_level(args)):  # the one place that decides what reaches the terminal
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The verb, its errors as one line and an exit status."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1: one of several processes started by torchrun
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.run(args) or 0
    except LmforgeError as exc:
        return _exit(f"lmforge {args.verb}: error{where}: {exc}", EXIT_USER_ERROR, world)
    except KeyboardInterrupt:
        return _exit(f"lmforge {args.verb}: interrupted{where}", EXIT_INTERRUPTED, world)
    except Exception as exc:
        if world > 1 and _is_collective_failure(
            exc
        ):  # another rank died first; its message is the one that counts
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return _exit(
                f"lmforge {args.verb}: error{where}: another process of the job failed "
                f"({type(exc).__name__}: {first[:200]})",
                EXIT_USER_ERROR,
                world,
            )
        raise


def _is_collective_failure(exc: Exception) -> bool:
    import torch.distributed as dist

    # gloo reports a dead peer as a plain RuntimeError from its transport ("Connection closed/reset by peer").
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


def _exit(message: str, code: int, world: int) -> int:
    """Print the one-line message; in a multi-process job leave at once, without waiting for ranks
    that may be blocked in a collective: torchrun sees the exit and stops the whole job."""
    print(message, file=sys.stderr)
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
