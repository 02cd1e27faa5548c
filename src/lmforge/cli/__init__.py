"""`lmforge VERB ...`: one command line for every stage of the pipeline.

`VERBS` maps each verb to the function that adds its parser and the function that runs it, taking
the parsed arguments; the option groups the verbs share are declared once, in `options`. Errors the
user can fix are raised as `LmforgeError` and printed here as one line with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lmforge import __version__
from lmforge.cli import data, evaluate, generate, interop, recipes, report, train
from lmforge.cli.options import THREADS, Subparsers
from lmforge.errors import LmforgeError
from lmforge.output import command_output

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: how a shell reports a writer whose reader left (`yes | head`)

AddParser = Callable[[Subparsers, str], argparse.ArgumentParser]  # adds verb NAME's parser, returns it
Run = Callable[[argparse.Namespace], int]  # runs the verb: the exit status

VERBS: dict[str, tuple[AddParser, Run]] = {
    "prepare": (data.add_prepare, data.run_prepare),
    "train": (train.add_train, train.run_train),
    "finetune": (train.add_finetune, train.run_finetune),
    "estimate": (train.add_estimate, train.run_estimate),
    "eval": (evaluate.add_eval, evaluate.run_eval),
    "sample": (generate.add_sample, generate.run_sample),
    "chat": (generate.add_chat, generate.run_chat),
    "serve": (generate.add_serve, generate.run_serve),
    "audit": (evaluate.add_audit, evaluate.run_audit),
    "inspect": (evaluate.add_inspect, evaluate.run_inspect),
    "compare": (evaluate.add_compare, evaluate.run_compare),
    "export": (interop.add_export, interop.run_export),
    "import": (interop.add_import, interop.run_import),
    "download": (interop.add_download, interop.run_download),
    "tasks": (data.add_tasks, data.run_tasks),
    "plot": (report.add_plot, report.run_plot),
    "runs": (report.add_runs, report.run_runs),
    "recipes": (recipes.add_recipes, recipes.run_recipes),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as the usage of the verb at fault, then exactly one line `PROG: error: MESSAGE`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Train and optimize GPT-style language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    _add_verbosity(parser)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (add_parser, run) in VERBS.items():
        add_parser(verbs, verb).set_defaults(run=run)
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
    if threads := THREADS.build(args):
        import torch

        torch.set_num_threads(threads)
    try:
        return args.run(args) or 0
    except LmforgeError as exc:
        return _exit(f"lmforge {args.verb}: error{where}: {exc}", EXIT_USER_ERROR, world)
    except KeyboardInterrupt:
        return _exit(f"lmforge {args.verb}: interrupted{where}", EXIT_INTERRUPTED, world)
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe, a socket, a child process: a real failure
            raise
        # `lmforge sample RUN | head`: the reader has gone, nothing to tell it. Python flushes stdout
        # once more at exit, which would fail again: it goes to /dev/null instead
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if _is_out_of_memory(exc):
            return _exit(
                f"lmforge {args.verb}: error{where}: {_out_of_memory_message(args.verb, exc)}",
                EXIT_USER_ERROR,
                world,
            )
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


def _is_out_of_memory(exc: BaseException) -> bool:
    """numpy's and Python's MemoryError, torch's OutOfMemoryError (CUDA) and its CPU allocator's failure."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _out_of_memory_message(verb: str, exc: BaseException) -> str:
    """One line: what did not fit, and what to lower."""
    detail = " ".join(str(exc).split())
    detail = detail[detail.find("DefaultCPUAllocator") :] if "DefaultCPUAllocator" in detail else detail
    if verb in ("train", "finetune"):
        advice = (
            "lower train.batch_size (train.grad_accum_steps keeps the tokens per step) or model.block_size; "
            "`lmforge estimate CONFIG` gives a config's memory"
        )
    else:
        advice = "lower the batch size or the length of the input"
    return f"out of memory ({detail[:300] or type(exc).__name__}): {advice}"


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: polled, it reports an error (a
    pipe) or a hang-up (a socket), while a stdout that is a file, a terminal or a live pipe reports
    neither."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file (a test's capture)
        return False
    if not hasattr(select, "poll"):  # Windows: no way to ask, so take the common case
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


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
