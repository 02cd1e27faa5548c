"""What reaches the terminal: library code logs under the `lmforge` logger; `lmforge -q` keeps
warnings, errors and results, `-v` adds debug lines; results stay on stdout."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge import progress
from lmforge.output import LOGGER_NAME, ON_STDOUT, command_output
from tests.conftest import TINY

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"


def library_trees() -> dict[Path, ast.Module]:
    """Every module of lmforge but the command line, which prints the results."""
    return {
        path: ast.parse(path.read_text())
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] != "cli"
    }


def calls_of(tree: ast.Module, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == name]


def test_library_code_logs_instead_of_printing() -> None:
    printed = [
        f"{p.relative_to(SRC)}:{c.lineno}"
        for p, tree in library_trees().items()
        for c in calls_of(tree, "print")
    ]
    assert printed == []


def test_every_module_logger_is_named_after_its_module_under_lmforge() -> None:
    named = [
        (str(path.relative_to(SRC)), ast.unparse(call.args[0]))
        for path, tree in library_trees().items()
        for call in calls_of(tree, "logging.getLogger")
    ]
    assert ("output.py", "LOGGER_NAME") in named  # the one logger the others are children of
    # model/lora.py quiets torchao's and torch's own loggers while torchao imports: not lmforge's
    children = [argument for path, argument in named if path not in ("output.py", "model/lora.py")]
    assert len(children) >= 8 and set(children) == {"__name__"}, named
    for name in ("lmforge.data.prepare", "lmforge.train.monitor"):
        module = importlib.import_module(name)
        assert module.logger.name == name and name.startswith(f"{LOGGER_NAME}.")


def test_library_use_shows_warnings_but_not_info(capsys) -> None:
    logger = logging.getLogger("lmforge.data.prepare")
    logger.debug("a debug message")
    logger.info("an info message")
    logger.warning("a warning")
    assert capsys.readouterr().err == "warning: a warning\n"


def test_lines_go_to_the_streams_of_the_moment_results_to_stdout() -> None:
    err, out = io.StringIO(), io.StringIO()
    logger = logging.getLogger("lmforge.train.monitor")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), command_output(logging.INFO):
        logger.info("step 10: val loss 2.0000", extra=ON_STDOUT)
        logger.info("downloading tinyshakespeare")
        logger.error("it broke")
    assert out.getvalue() == "step 10: val loss 2.0000\n"
    assert err.getvalue() == "downloading tinyshakespeare\nerror: it broke\n"


def test_a_command_sets_the_level_for_itself_only() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    before = logger.level
    with command_output(logging.DEBUG):
        assert logger.isEnabledFor(logging.DEBUG)
    assert logger.level == before


@pytest.fixture
def config_file(tmp_path: Path, char_data: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(f'[data]\ndir = "{char_data}"\n')
    return path


def train(cli, config_file: Path, out: Path, *options: str) -> tuple[int, str, str]:
    steps = ["train.max_steps=4", "train.eval_interval=2", "train.checkpoint_interval=4", "log.progress=true"]
    sets = [arg for item in (*TINY, *steps) for arg in ("--set", item)]
    return cli(*options, "train", config_file, "--out", out, *sets)


def test_quiet_keeps_the_result_and_drops_the_messages(cli, config_file: Path, tmp_path: Path) -> None:
    code, out, err = train(cli, config_file, tmp_path / "loud")
    assert code == 0, err
    assert "training on cpu" in out and "step 2: val loss" in out
    assert out.splitlines()[-1].startswith("done: 4 steps") and "\r" not in out + err
    code, out, err = train(cli, config_file, tmp_path / "quiet", "-q")
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith("done: 4 steps")


def test_quiet_keeps_errors(cli, tmp_path: Path) -> None:
    code, out, err = cli("-q", "train", tmp_path / "missing.toml")
    assert code == 1 and out == "" and err.startswith("lmforge train: error: ") and err.count("\n") == 1


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("to be or not to be\n" * 200)
    return path


def test_quiet_keeps_warnings_and_the_summary(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"to be or not to be\n" * 200 + b"\xff\n")
    code, _, err = cli(
        "-q", "prepare", bad, "--tokenizer", "char", "--out", tmp_path / "d", "--invalid-utf8", "replace"
    )
    assert code == 0, err
    *warnings, summary = err.splitlines()
    assert set(warnings) == {
        f"warning: {bad}: invalid UTF-8 from byte 3800 replaced with U+FFFD"
    }  # once a pass
    assert summary.startswith(f"prepared {bad}: ")


@pytest.mark.parametrize("where", ["-q prepare", "prepare -q"])
def test_prepare_quiet_before_or_after_the_verb_drops_progress(
    cli, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    ticks = iter(range(0, 10_000, 11))  # 11 s between two readings of the clock: a progress line per update
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    args = [text, "--tokenizer", "char", "--out", tmp_path / "d"]
    _, _, loud = cli("prepare", *args)
    assert "scan: " in loud and "encode: " in loud
    _, _, quiet = cli(*where.split(), *args, "--overwrite")
    assert quiet.count("\n") == 1 and quiet.startswith(f"prepared {text}: ")


def test_verbose_adds_debug_lines(cli, text: Path, tmp_path: Path) -> None:
    code, _, err = cli("-v", "prepare", text, "--tokenizer", "char", "--out", tmp_path / "d")
    assert code == 0 and f"debug: scanned {text}: 1 document(s), 3,800 characters" in err
    code, _, err = cli("prepare", text, "--tokenizer", "char", "--out", tmp_path / "e")
    assert code == 0 and "debug:" not in err


def test_quiet_and_verbose_exclude_each_other(cli, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli("-q", "-v", "runs")
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
