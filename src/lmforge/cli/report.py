"""`lmforge runs` and `plot`: what the run folders hold, as a table and as curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.options import Subparsers
from lmforge.report import SORT_KEYS, X_AXES


def run_plot(args: argparse.Namespace) -> int:
    from lmforge.report.plot import save_plot

    out = save_plot([Path(run) for run in args.runs], Path(args.out), args.x)
    print(f"plotted {len(args.runs)} run{'s' if len(args.runs) > 1 else ''} -> {out}")
    return 0


def add_plot(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="loss, val loss, learning rate, grad norm and tokens/s of runs, overlaid",
        description="Draw the curves of one or more runs from their metrics.jsonl into one picture: "
        "train and val loss and grad norm (log scale), learning rate and tokens/s.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    # a picture file, not an output folder: nothing to --overwrite
    p.add_argument("--out", required=True, help="the picture: FILE.png (or .svg, .pdf, ...)")
    p.add_argument("--x", default="step", choices=X_AXES, help="the x axis (default step)")
    return p


def run_runs(args: argparse.Namespace) -> int:
    from lmforge.report.runs import runs_report

    print(runs_report(Path(args.dir), args.sort, args.json))
    return 0


def add_runs(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="one line per run folder: steps, best val loss, tokens, wall time, status",
        description="List the run folders in DIR (or DIR itself): steps done/planned, best val loss, "
        "tokens, wall time and status (finished, interrupted, or running while a process holds its lock).",
    )
    p.add_argument("dir", nargs="?", default="runs", help="a folder of runs, or a run folder (default runs)")
    p.add_argument("--sort", default="name", choices=SORT_KEYS, help="order (default name)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return p
