"""`lmforge recipes`: the configs shipped inside the package, listed, shown and copied."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.options import Subparsers


def run_recipes(args: argparse.Namespace) -> int:
    from lmforge.recipes import copy_recipe, recipe, recipes

    if args.action == "show":
        print(recipe(args.name).path.read_text(encoding="utf-8"), end="")
    elif args.action == "copy":
        target = copy_recipe(args.name, Path(args.dir), overwrite=args.overwrite)
        print(f"{args.name} -> {target}")
    else:
        found = recipes()
        width = max(len(r.name) for r in found)
        for r in found:
            print(f"{r.name:<{width}}  {r.summary}")
    return 0


def add_recipes(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="list, show or copy the packaged recipes (configs for train and finetune)",
        description="The recipes shipped with lmforge: `lmforge train NAME` / `lmforge finetune NAME` "
        "run one by name. `list` (or no action) lists them: name and the first line of each header.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="list them (the default)", description="List the recipes.")
    show = actions.add_parser("show", help="print a recipe", description="Print recipe NAME's TOML.")
    show.add_argument("name", help="a recipe name, e.g. shakespeare-char or tasks/sst2")
    copy = actions.add_parser(
        "copy",
        help="copy a recipe into a folder, to edit it",
        description="Copy recipe NAME into DIR (created if needed) under its own file name.",
    )
    copy.add_argument("name", help="a recipe name, e.g. shakespeare-char or tasks/sst2")
    copy.add_argument("dir", help="the folder to copy it into")
    copy.add_argument("--overwrite", action="store_true", help="replace a file of that name in DIR")
    return p
