"""`lmforge prepare` and `lmforge tasks prepare`: text and task datasets made ready for training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.cli.options import OUTPUT, Subparsers, positive_int, seed
from lmforge.errors import LmforgeError
from lmforge.tasks import DEFAULT_VAL_FRACTION, tasks_with_datasets


def run_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.canaries import check_spec
    from lmforge.data.pii import parse_kinds
    from lmforge.data.prepare import prepare
    from lmforge.data.tokenizer import BUILTIN_KINDS

    tokenizer = args.tokenizer
    # a data, run or checkpoint folder: encode with its tokenizer (a folder named "bpe" does not count)
    if tokenizer not in BUILTIN_KINDS and Path(tokenizer).is_dir():
        from lmforge.checkpoint import tokenizer_file_of

        tokenizer = str(tokenizer_file_of(Path(tokenizer)))
    out = OUTPUT.build(args)
    report = prepare(
        args.input,
        out=out.path,
        tokenizer=tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=out.overwrite,
        invalid_utf8=args.invalid_utf8,
        progress=not args.quiet,
        unknown_chars=args.unknown_chars,
        scrub_pii=parse_kinds(args.scrub_pii),
        canaries=check_spec(args.canaries, args.canary_repeats, args.seed),
        holdout_lines=args.holdout_lines,
        input_format=args.format,
        text_column=args.text_column,
    )
    print(report.summary, file=sys.stderr)  # the result, on stderr as always, even under -q
    return 0


def add_prepare(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="tokenize a text file, folder or named dataset into token shards",
        description="Tokenize INPUT into OUT/train.bin, OUT/val.bin, OUT/tokenizer.json and OUT/meta.json.",
    )
    p.add_argument(
        "input",
        help="a file, a folder (.txt/.md/.raw/.text and .jsonl/.json/.csv/.tsv/.parquet, recursive), a "
        "dataset name (tinyshakespeare, gutenberg, wikitext-2) or hf:ORG/NAME[:CONFIG][@SPLIT], a Hugging "
        "Face dataset (or hf:PATH, a local one) streamed record by record",
    )
    p.add_argument(
        "--format",
        default="auto",
        metavar="{auto,text,jsonl,json,csv,tsv,parquet}",  # checked by `prepare` (sources.INPUT_FORMATS)
        help="how to read the files: auto (by suffix; other types are an error), text (each file one "
        "document), or records of jsonl, json, csv, tsv or parquet (each record one document)",
    )
    p.add_argument(
        "--text-column",
        metavar="NAME",
        help="the column (JSON key) of records that holds the text (default: text)",
    )
    OUTPUT.add(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="{char,byte,bpe,PATH}",
        help="a built-in kind, a tokenizer.json, or a data, run or checkpoint folder (its tokenizer)",
    )
    p.add_argument("--vocab-size", type=positive_int, default=None, help="BPE vocabulary size (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out (default 0.1)")
    p.add_argument("--seed", type=seed, default=0, help="seed for the choice of validation documents")
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
    return p


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


def run_tasks(args: argparse.Namespace) -> int:
    """`lmforge tasks ACTION`: prepare a task's files, or write the text its tokenizer trains on."""
    return {"prepare": _tasks_prepare, "text": _tasks_text}[args.action](args)


def _tasks_text(args: argparse.Namespace) -> int:
    from lmforge.tasks import write_task_text

    written = write_task_text(
        args.task,
        Path(args.out),
        root=Path(args.data_dir) if args.data_dir else None,
        prepared=Path(args.prepared) if args.prepared else None,
        overwrite=args.overwrite,
    )
    print(f"{args.task}: {written:,} characters of tokenizer text -> {args.out}")
    return 0


def _add_tasks_text(actions: Subparsers) -> None:
    t = actions.add_parser(
        "text",
        help="write the text a task recipe trains its tokenizer on",
        description="Write the plain text a task's recipe trains its BPE tokenizer (or, for squad, its "
        "first stage) on, for `lmforge prepare FILE`: sst2, the training sentences and the prompt's "
        "words; multi30k, the English and German training sentences and the prompt's words; squad, the "
        "prompts and answers of a prepared folder's train.jsonl.",
    )
    t.add_argument("task", choices=("sst2", "multi30k", "squad"))
    t.add_argument("--out", required=True, help="the text file to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--prepared", metavar="DIR", help="squad: the folder `tasks prepare squad` wrote")
    t.add_argument("--data-dir", help="folder of the shared datasets (default $LMFORGE_DATA_DIR)")


def _tasks_prepare(args: argparse.Namespace) -> int:
    from lmforge.tasks import CorpusSource, prepare_task

    if args.examples is not None and args.corpus is None:
        raise LmforgeError("--examples needs --from (both apply to tasks made from a corpus)")
    out = OUTPUT.build(args)
    prepared = prepare_task(
        args.task,
        out.path,
        Path(args.data_dir) if args.data_dir else None,
        overwrite=out.overwrite,
        val_fraction=args.val_fraction,
        seed=args.seed,
        corpus=CorpusSource(args.corpus, args.examples) if args.corpus else None,
    )
    print(prepared.summary(args.task, args.out))
    return 0


def add_tasks(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    with_datasets = tasks_with_datasets()
    p = verbs.add_parser(name, help=f"task datasets ({', '.join(with_datasets)}) as JSONL for finetune")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser(
        "prepare",
        help="write a task's train/val/eval JSONL files",
        description="Convert a shared task dataset into prompt/completion JSONL files: train.jsonl, "
        "val.jsonl (checkpoint selection: the dataset's validation split, else carved from train) and "
        "eval.jsonl (the scored split, read only by `lmforge eval --task`).",
    )
    q.add_argument("task", choices=with_datasets)
    OUTPUT.add(q)
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
    q.add_argument(
        "--data-dir",
        help="folder of the datasets (default $LMFORGE_DATA_DIR; a file not there comes from the cache, "
        "else is downloaded and checked against its pinned sha256)",
    )
    _add_tasks_text(actions)
    return p
