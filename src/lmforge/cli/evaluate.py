"""`lmforge eval`, `audit`, `inspect` and `compare`: what a checkpoint scores, leaks and does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.options import MODEL_SOURCE, OUTPUT, SAMPLING, THREADS, Subparsers, positive_int, seed
from lmforge.tasks import TASKS


def run_eval(args: argparse.Namespace) -> int:
    from lmforge.eval.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        MODEL_SOURCE.build(args),
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


def add_eval(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="loss/perplexity/bits per byte, or task metrics (accuracy, BLEU, EM/F1, ROUGE)",
        description="Evaluate a checkpoint over the whole val split of prepared data, "
        "or on a task's eval.jsonl with --task.",
    )
    MODEL_SOURCE.add(p)
    THREADS.add(p)
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
    p.add_argument(  # a decoding task's answer length, not sampling: eval decodes greedily or by beam
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
    return p


def run_audit(args: argparse.Namespace) -> int:
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
        MODEL_SOURCE.build(args),
        Path(args.data) if args.data else None,
        Path(args.canaries) if args.canaries else None,
        options=options,
    )
    print(report.json_line() if args.json else report.text())
    return 0


def add_audit(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="leakage audit: canary exposure, verbatim memorisation, membership inference AUC",
        description="Measure what a checkpoint gives away about its training data: the exposure of "
        "the canaries `prepare --canaries` inserted, by repeat count; the share of train vs val prefixes "
        "whose greedy continuation is verbatim; the AUC of membership inference by loss between the "
        "member and held-out lines of `prepare --holdout-lines`.",
    )
    MODEL_SOURCE.add(p)
    THREADS.add(p)
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
    return p


def run_inspect(args: argparse.Namespace) -> int:
    from lmforge.eval.inspect import inspect_checkpoint

    out = OUTPUT.build(args)
    report = inspect_checkpoint(
        MODEL_SOURCE.build(args),
        prompt=args.prompt,
        out=out.path,
        top_k=args.top_k,
        overwrite=out.overwrite,
    )
    print(report.describe())
    return 0


def add_inspect(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="attention maps, logit lens, per-token surprisal and top-k of a prompt",
        description="Run PROMPT through a checkpoint once and write to OUT: attention_layer{i}.png "
        "(every head), logit_lens.png/.tsv (each layer's prediction through the final norm and head), "
        "surprisal.html (per-token loss), topk.json and summary.json.",
    )
    MODEL_SOURCE.add(p)
    THREADS.add(p)
    p.add_argument("--prompt", required=True, help="the text to inspect (at most block_size tokens)")
    OUTPUT.add(p)
    p.add_argument(
        "--top-k", type=positive_int, default=5, help="next tokens listed per position (default 5)"
    )
    return p


def run_compare(args: argparse.Namespace) -> int:
    if args.tally:
        if args.runs or args.prompts or args.out:
            args.parser.error("--tally DIR JUDGMENTS takes no runs, --prompts or --out")
        from lmforge.eval.compare import check_preferences_out, tally, write_preferences

        folder, judgments = Path(args.tally[0]), Path(args.tally[1])
        preferences = Path(args.preferences) if args.preferences else None
        if preferences is not None:
            check_preferences_out(preferences, inputs=(folder, judgments), overwrite=args.overwrite)
        result = tally(folder, judgments)
        written = None if preferences is None else write_preferences(result, folder, preferences)
        if args.json:
            extra = {} if written is None else {"preferences": dict(written.as_dict())}
            print(json.dumps(result.as_dict() | extra, ensure_ascii=False))
        else:
            print(result.text() + ("" if written is None else "\n" + written.describe()))
        return 0
    if args.preferences:
        args.parser.error("--preferences OUT.jsonl goes with --tally DIR JUDGMENTS")
    if len(args.runs) != 2 or not args.prompts or not args.out:
        args.parser.error("give two runs, --prompts FILE and --out DIR (or --tally DIR JUDGMENTS)")
    from lmforge.eval.compare import make_sheet

    options = SAMPLING.build(args)
    a, b = (MODEL_SOURCE.build(args, target=run) for run in args.runs)
    out = OUTPUT.build(args)
    report = make_sheet(
        (a, b),
        Path(args.prompts),
        out.path,
        options=options,
        seed=args.seed,
        chat=args.chat,
        overwrite=out.overwrite,
    )
    print(report.describe())
    return 0


def add_compare(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
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
    OUTPUT.add(p, required=False, out_help="folder for sheet.html and key.json", metavar="DIR")
    p.add_argument(
        "--tally", nargs=2, metavar=("DIR", "JUDGMENTS"), help="un-blind a downloaded judgments.json"
    )
    p.add_argument("--json", action="store_true", help="--tally: print one JSON object")
    p.add_argument(
        "--preferences",
        metavar="OUT.jsonl",
        help="--tally: also write each prompt one run won as a preference pair (prompt, chosen, rejected, "
        "and which run wrote each) for train.objective = dpo; ties are dropped and counted",
    )
    MODEL_SOURCE.add(p, target=False)
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through each "
        "run's chat template (default: continue the prompt as text)",
    )
    SAMPLING.add(
        p,
        max_new_tokens=None,
        max_new_tokens_help="answer length cap (default 128; with --chat at most half the smaller context)",
        seed_help="seed of the sides' shuffle; prompt i is sampled with seed + i by both runs",
    )
    return p
