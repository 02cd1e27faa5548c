"""The command line's option groups: each declared once, by one object, and built into one value."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import VERBS, build_parser
from lmforge.cli.options import MODEL_SOURCE, OUTPUT, SAMPLING
from lmforge.errors import LmforgeError
from lmforge.inference import ModelSource
from lmforge.inference.sampling import SamplingOptions

SAMPLING_FLAGS = ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed")


def verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (verbs,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(verbs.choices)


def test_every_verb_that_samples_gets_its_flags_from_the_one_sampling_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given_to: list[str] = []
    add = SAMPLING.add
    monkeypatch.setattr(
        SAMPLING, "add", lambda parser, **defaults: (given_to.append(parser.prog), add(parser, **defaults))
    )
    parsers = verb_parsers(build_parser())
    sampling_verbs = [
        f"lmforge {verb}"
        for verb, parser in parsers.items()
        if "--temperature" in parser._option_string_actions
    ]
    assert given_to == sampling_verbs == ["lmforge sample", "lmforge chat", "lmforge compare"]
    for verb in ("sample", "chat", "compare"):
        assert set(SAMPLING_FLAGS) <= parsers[verb]._option_string_actions.keys()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sample", "run"], SamplingOptions(500, 0.8, 200, None)),
        (["chat", "run"], SamplingOptions(None, 0.8, 200, None)),  # None: half the context
        (["compare", "a", "b"], SamplingOptions(None, 0.8, 200, None)),  # None: 128, or what fits
        (
            ["sample", "run", "--temperature", "0", "--top-k", "5", "--top-p", "0.9"],
            SamplingOptions(500, 0.0, 5, 0.9),
        ),
        (["chat", "run", "--max-new-tokens", "7"], SamplingOptions(7, 0.8, 200, None)),
    ],
)
def test_the_sampling_group_builds_one_sampling_options_with_each_verbs_defaults(
    argv: list[str], expected: SamplingOptions
) -> None:
    args = build_parser().parse_args(argv)
    assert SAMPLING.build(args) == expected
    assert args.seed == 1337


def test_the_sampling_group_checks_what_it_builds() -> None:
    args = build_parser().parse_args(["chat", "run", "--top-p", "1.5"])
    with pytest.raises(LmforgeError, match="--top-p must be in"):
        SAMPLING.build(args)


def test_the_model_source_group_builds_a_model_source_for_the_target_or_each_named_run() -> None:
    args = build_parser().parse_args(
        ["eval", "run", "--checkpoint", "last", "--device", "cpu", "--dtype", "bf16"]
    )
    assert MODEL_SOURCE.build(args) == ModelSource(Path("run"), "last", "cpu", "bf16")
    args = build_parser().parse_args(["compare", "a", "b", "--device", "cpu"])
    assert [MODEL_SOURCE.build(args, target=run) for run in args.runs] == [
        ModelSource(Path("a"), "best", "cpu", "fp32"),
        ModelSource(Path("b"), "best", "cpu", "fp32"),
    ]


def test_the_output_group_builds_the_folder_and_whether_to_overwrite_it() -> None:
    args = build_parser().parse_args(["inspect", "run", "--prompt", "hi", "--out", "x", "--overwrite"])
    built = OUTPUT.build(args)
    assert (built.path, built.overwrite) == (Path("x"), True)
    assert OUTPUT.build(build_parser().parse_args(["train", "c.toml"])).path is None  # runs/CONFIG_NAME
    with pytest.raises(LmforgeError, match="--out is empty"):
        OUTPUT.build(build_parser().parse_args(["prepare", "in.txt", "--tokenizer", "char", "--out", ""]))


def test_the_verb_table_names_every_verb_in_the_order_help_lists_them() -> None:
    assert list(verb_parsers(build_parser())) == list(VERBS)


BREAK_ANOTHER_PIPE = """
import argparse, os, sys
from lmforge.cli import _run

def write_to_a_pipe_nobody_reads(args):
    print("before", flush=True)
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.write(write_end, b"x")  # BrokenPipeError: the pipe's reader has gone, stdout's has not

sys.exit(_run(argparse.Namespace(verb="serve", run=write_to_a_pipe_nobody_reads)))
"""


def test_a_broken_pipe_other_than_stdout_is_an_error_not_a_quiet_exit_141() -> None:
    """Exit 141 without a word is for `lmforge ... | head` alone (tests/inference/test_sample.py): a
    pipe, socket or child process that breaks under a verb is a failure, reported as any other."""
    result = subprocess.run([sys.executable, "-c", BREAK_ANOTHER_PIPE], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == "before\n"
    assert "BrokenPipeError" in result.stderr
