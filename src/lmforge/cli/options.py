"""The command line's option groups and argument types.

Each group is declared once, by `add(parser, **defaults)` with the verb's own defaults and help, and
turned into one value once, by `build(args)`: the model source into a `ModelSource`, sampling into a
`SamplingOptions`, the output folder into an `OutputFolder`, the threads into a count.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import DTYPE_NAMES, SEED_LIMIT
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.inference import ModelSource
    from lmforge.inference.sampling import SamplingOptions

Subparsers = argparse._SubParsersAction  # what `add_subparsers` returns: each verb adds its parser to it
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


class ModelSourceGroup:
    """TARGET, --checkpoint, --device, --dtype: which checkpoint to load, onto what device, in what
    precision."""

    def add(self, parser: argparse.ArgumentParser, *, target: bool = True, device: bool = True) -> None:
        """The options; without `target` the verb names its own folders (compare's two runs), without
        `device` it runs no model (export)."""
        if target:
            parser.add_argument("target", help="a run folder or a checkpoint folder")
        parser.add_argument(
            "--checkpoint", default="best", help="best (lowest val loss), last, or a checkpoint folder"
        )
        if device:
            parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        parser.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)

    def build(self, args: argparse.Namespace, target: str | None = None) -> ModelSource:
        """The checkpoint of TARGET, or of `target` where the verb names its own."""
        from lmforge.inference import ModelSource

        folder = args.target if target is None else target
        return ModelSource(Path(folder), args.checkpoint, args.device, args.dtype)


class SamplingGroup:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed: how a verb samples. The seed is
    not part of the options built: each verb gives it its own use (compare's shuffle, say)."""

    def add(
        self,
        parser: argparse.ArgumentParser,
        *,
        max_new_tokens: int | None,
        max_new_tokens_help: str | None = None,
        seed_help: str | None = None,
    ) -> None:
        """The options, with the verb's answer length (None: the library's default, which
        `max_new_tokens_help` then states) and what its seed does."""
        parser.add_argument(
            "--max-new-tokens", type=positive_int, default=max_new_tokens, help=max_new_tokens_help
        )
        parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
        parser.add_argument("--top-k", type=positive_int, default=200)
        parser.add_argument("--top-p", type=float, default=None)
        parser.add_argument("--seed", type=seed, default=1337, help=seed_help)

    def build(self, args: argparse.Namespace) -> SamplingOptions:
        """The options, checked (a bad --temperature or --top-p is a one-line error here)."""
        from lmforge.inference.sampling import SamplingOptions

        return SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p)


@dataclass(frozen=True)
class OutputFolder:
    """Where a verb writes, and whether it may replace what lmforge wrote there before."""

    path: Path | None  # None: no --out, where the verb has a default (train's runs/CONFIG_NAME)
    overwrite: bool


class OutputGroup:
    """--out and --overwrite: the folder a verb writes."""

    def add(
        self,
        parser: argparse.ArgumentParser,
        *,
        required: bool = True,
        out_help: str = "output folder",
        metavar: str | None = None,
        overwrite_help: str = OVERWRITE_HELP,
    ) -> None:
        parser.add_argument("--out", required=required, metavar=metavar, help=out_help)
        parser.add_argument("--overwrite", action="store_true", help=overwrite_help)

    def build(self, args: argparse.Namespace) -> OutputFolder:
        if args.out == "":  # not the working folder by accident
            raise LmforgeError("--out is empty: give a folder")
        return OutputFolder(None if args.out is None else Path(args.out), args.overwrite)


class ThreadsGroup:
    """--threads: the CPU threads of a verb that runs a model."""

    def add(self, parser: argparse.ArgumentParser, *, default: str = "PyTorch's: one per core") -> None:
        """The option, with what the verb does without it (`default`, in words)."""
        parser.add_argument(
            "--threads",
            type=positive_int,
            help=f"CPU threads for the model's operations (default: {default}); a small model "
            "decodes as fast or faster on fewer",
        )

    def build(self, args: argparse.Namespace) -> int | None:
        """The count given; None without one, or for a verb that has no --threads."""
        return getattr(args, "threads", None)


MODEL_SOURCE = ModelSourceGroup()
SAMPLING = SamplingGroup()
OUTPUT = OutputGroup()
THREADS = ThreadsGroup()
