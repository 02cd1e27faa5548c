"""`lmforge VERB ...`: one command line for every stage of the pipeline.

Each verb is a function taking parsed arguments; errors the user can fix are raised as
`LmforgeError` and printed here as one line with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lmforge import __version__
from lmforge.errors import LmforgeError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def _prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import prepare

    prepare(
        args.input,
        out=args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        invalid_utf8=args.invalid_utf8,
        progress=not args.quiet,
    )


def _add_prepare(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "prepare",
        help="tokenize a text file, folder or named dataset into token shards",
        description="Tokenize INPUT into OUT/train.bin, OUT/val.bin, OUT/tokenizer.json and OUT/meta.json.",
    )
    p.add_argument("input", help="a text file, a folder (.txt/.md/.raw/.jsonl, recursive) or a dataset name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--tokenizer", required=True, metavar="{char,byte,bpe,PATH}", help="a built-in kind or a tokenizer.json"
    )
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of validation documents")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--invalid-utf8",
        choices=("error", "replace"),
        default="error",
        help="what to do with bytes that are not UTF-8: stop with an error (default) or replace with U+FFFD",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_prepare)


VERBS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_prepare,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train and optimize GPT-style language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verb in VERBS:
        add_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LmforgeError as exc:
        print(f"lmforge {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
