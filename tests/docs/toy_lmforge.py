"""`lmforge` at toy size: what the docs' runnable blocks call when tests/docs/test_docs.py runs them.

The blocks are the commands a reader types. This stand-in runs the real CLI (`lmforge.cli.main`) with
the same arguments plus settings that make each command take seconds:

- train / finetune: a one-layer, 32-wide model, 4 sequences a batch, and every step count (steps,
  eval and checkpoint intervals, warmup) divided by STEP_DIVISOR, so that the ratios between them,
  and a `--resume` to more steps, still mean what they say. A key the block sets itself keeps its
  value, except the step counts, which are divided too.
- sample, chat, compare, eval --task, audit: fewer tokens, examples and samples.

Usage: python toy_lmforge.py ARGS... (the arguments of `lmforge`). With LMFORGE_DOCS_FIXTURES=1 the
named datasets are pinned to the small copies in tests/fixtures/data, as tests/conftest.py pins them.

`python toy_lmforge.py --fork-server PATH` imports torch and every module of lmforge (peft and
torchao too) once and serves calls on the unix socket PATH (tests/docs/forkserver.py); with
LMFORGE_TOY_FORK_SERVER=PATH in its environment, `python toy_lmforge.py ARGS...` runs as a forked
child of that server instead of importing them itself: the same command, seconds sooner. So does
`python toy_lmforge.py --python SHIM ARGS...`, what a block's `.venv/bin/python ARGS...` runs (SHIM: that
stand-in; a script, `-`, `-c` or `-m`; other forms, or no server, run the interpreter itself).
"""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
import runpy
import sys
import types
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
STEP_DIVISOR = 400
STEP_KEYS = ("train.max_steps", "train.eval_interval", "train.checkpoint_interval", "schedule.warmup_steps")
TOY_MODEL = {"model.n_layer": "1", "model.d_model": "32", "model.n_head": "2", "train.batch_size": "4"}
CONFIG_DEFAULTS = {"train.max_steps": 2000, "train.eval_interval": 250, "train.checkpoint_interval": 500}
TOY_FLAGS = {  # appended: argparse keeps the last value of a repeated option
    "sample": ["--max-new-tokens", "16", "--num-samples", "1"],
    "chat": ["--max-new-tokens", "16"],
    "compare": ["--max-new-tokens", "8"],
    "audit": ["--alternatives", "50", "--prefixes", "4", "--sequences", "8"],
}


def _toy_steps(value: str) -> str:
    steps = int(value)
    return str(steps and max(1, math.ceil(steps / STEP_DIVISOR)))  # 0 (off) stays 0


def _given_sets(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a, prev in zip(args, [""] + args) if prev == "--set" and "=" in a)


def _config_steps(args: list[str], verb_at: int) -> dict[str, str]:
    """The step counts of the config file the command names (the defaults where it names none)."""
    steps = {k: str(v) for k, v in CONFIG_DEFAULTS.items()}
    rest = args[verb_at + 1 :]
    if rest and rest[0].endswith(".toml") and Path(rest[0]).is_file():
        raw = tomllib.loads(Path(rest[0]).read_text())
        for key in STEP_KEYS:
            section, name = key.split(".")
            if name in raw.get(section, {}):
                steps[key] = str(raw[section][name])
    return steps


def toy_training(args: list[str], verb_at: int) -> list[str]:
    """train/finetune's arguments with the toy model and every step count divided."""
    given = _given_sets(args)
    out = []
    for arg, prev in zip(args, [""] + args):
        key, _, value = arg.partition("=")
        out.append(f"{key}={_toy_steps(value)}" if prev == "--set" and key in STEP_KEYS else arg)
    resuming = "--resume" in args
    settings = {} if resuming else {**TOY_MODEL, **_config_steps(args, verb_at)}
    for key, value in settings.items():
        if key not in given:
            out += ["--set", f"{key}={_toy_steps(value) if key in STEP_KEYS else value}"]
    return out


def toy_args(args: list[str]) -> list[str]:
    verbs = [i for i, a in enumerate(args) if not a.startswith("-")]
    if not verbs:
        return args
    verb = args[verbs[0]]
    if verb in ("train", "finetune"):
        return toy_training(args, verbs[0])
    if verb == "eval" and "--task" in args:
        return args + ["--limit", "8", "--max-new-tokens", "8"]
    return args + TOY_FLAGS.get(verb, [])


FORK_SERVER_ENV = "LMFORGE_TOY_FORK_SERVER"  # the socket of a running fork server: calls go there
FORK_SERVER_FLAG = "--fork-server"
PYTHON_FLAG = "--python"  # `toy_lmforge.py --python SHIM ARGS...`: `SHIM ARGS...`, SHIM a stand-in python
PYTHON_FORMS = ("-", "-c", "-m")  # besides a script: what run_python runs; other options go to python


def run_cli(argv: list[str]) -> int:
    """`lmforge ARGS...` at toy size, in this process."""
    if os.environ.get("LMFORGE_DOCS_FIXTURES") == "1":
        sys.path.insert(0, str(REPO / "tests" / "fixtures"))
        from pinned import pin_to_fixtures

        pin_to_fixtures()
    from lmforge.cli import main as lmforge_main

    return lmforge_main(toy_args(argv))


def run_python(executable: str, args: list[str]) -> int:
    """`python ARGS...` in this process, as the interpreter runs a script, `-` (the program on stdin),
    `-c CODE` or `-m MODULE`: as `__main__`, with its sys.argv and sys.path[0]; `executable` (the
    stand-in's path) is sys.executable, so that the program's own `python` calls come here too."""
    sys.executable = executable
    first, *rest = args
    here = str(Path(__file__).parent)
    path = [p for p in sys.path if p != here]  # this file's folder is the server script's, not theirs
    if first == "-m":
        sys.path[:] = [os.getcwd(), *path]
        sys.argv = rest
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    elif first in ("-", "-c"):
        source = sys.stdin.read() if first == "-" else rest.pop(0)
        sys.path[:] = ["", *path]
        sys.argv = [first, *rest]
        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(source, "<stdin>" if first == "-" else "<string>", "exec"), main.__dict__)
    else:
        sys.path[:] = [os.path.dirname(os.path.realpath(first)), *path]
        sys.argv = args
        runpy.run_path(first, run_name="__main__")
    return 0


def run_forked(argv: list[str]) -> int:
    """`run_cli` (or `run_python`) in a child of the fork server, which has torch's thread count from
    the server's OMP_NUM_THREADS (read once, at load): this call's, as a process of its own would."""
    if threads := os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(threads))
    return run_python(argv[1], argv[2:]) if argv[:1] == [PYTHON_FLAG] else run_cli(argv)


def preload() -> None:
    """Import what any verb imports, so that the fork server's children need not: every module of
    lmforge, and peft (with transformers and torchao) as LoRA imports it. No tensor op runs here."""
    import lmforge
    from lmforge.model.lora import import_peft

    for module in pkgutil.walk_packages(lmforge.__path__, "lmforge."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    import_peft()


def main() -> int:
    sys.path.insert(0, str(REPO / "src"))
    import forkserver  # beside this file, on sys.path as the script's folder

    if sys.argv[1:2] == [FORK_SERVER_FLAG]:
        preload()
        forkserver.serve(sys.argv[2], run_forked)  # until SIGTERM
    server = os.environ.get(FORK_SERVER_ENV)
    if sys.argv[1:2] == [PYTHON_FLAG]:
        shim, *python = sys.argv[2:]
        if not (server and python and (python[0] in PYTHON_FORMS or not python[0].startswith("-"))):
            os.execv(sys.executable, [sys.executable, *python])  # the interpreter itself
        return forkserver.call(server, [PYTHON_FLAG, os.path.abspath(shim), *python])
    if server:
        return forkserver.call(server, sys.argv[1:])
    return run_cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
