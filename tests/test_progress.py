"""Progress bars draw on a terminal only; elsewhere a plain line through the logger every few seconds."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from lmforge import progress
from lmforge.output import command_output
from lmforge.progress import LINE_INTERVAL_S, ProgressLines, progress_bar


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """lmforge.progress's time, moved on by hand: `clock.now` seconds."""
    fake = SimpleNamespace(now=0.0)
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: fake.now))
    return fake


def test_off_a_terminal_progress_is_a_line_at_most_every_interval(capsys, clock) -> None:
    with command_output(logging.INFO):
        with progress_bar(total=100_000, desc="encode", unit="B", stream=io.StringIO()) as bar:
            assert isinstance(bar, ProgressLines)
            for _ in range(100_000):  # 100 s of work in updates of a millisecond
                clock.now += 0.001
                bar.update(1)
    captured = capsys.readouterr()
    lines = captured.err.splitlines(keepends=True)
    assert len(lines) <= 100 / LINE_INTERVAL_S and len(lines) >= 100 / LINE_INTERVAL_S - 1
    assert all(line.startswith("encode: ") and line.endswith("\n") for line in lines)
    assert "\r" not in captured.err and captured.out == ""


def test_work_shorter_than_the_interval_prints_nothing(capsys, clock) -> None:
    with (
        command_output(logging.INFO),
        progress_bar(total=10, desc="scan", unit="B", stream=io.StringIO()) as bar,
    ):
        clock.now = LINE_INTERVAL_S / 2
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_a_progress_line_says_how_far_how_fast_and_how_long(clock) -> None:
    lines = ProgressLines(total=5000, desc="train", unit="step", initial=1000)
    lines.update(1000)
    lines.set_postfix({"loss": "2.3100"})
    assert lines.line(20.0) == "train: 2,000/5,000 step (40%), 50 step/s, 00:20 elapsed, loss 2.3100"
    scaled = ProgressLines(total=2_000_000, desc="encode", unit="B", unit_scale=True)
    scaled.update(500_000)
    assert scaled.line(10.0) == "encode: 500kB/2.00MB (25%), 50.0kB/s, 00:10 elapsed"


def test_a_terminal_gets_a_tqdm_bar() -> None:
    with command_output(logging.INFO):
        bar = progress_bar(total=10, desc="scan", unit="B", stream=Terminal())
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()


def test_quiet_or_disabled_shows_no_bar_and_no_line(capsys, clock) -> None:
    for level, enabled in ((logging.WARNING, True), (logging.INFO, False)):
        with command_output(level):
            bar = progress_bar(total=10, desc="scan", unit="B", enabled=enabled, stream=Terminal())
            assert not isinstance(bar, tqdm)
            clock.now += 2 * LINE_INTERVAL_S
            bar.update(5)
    assert capsys.readouterr().err == ""


def test_an_iterable_is_wrapped_whole(clock) -> None:
    with command_output(logging.INFO):
        wrapped = progress_bar(["a", "b", "c"], desc="answering", unit="prompt", stream=io.StringIO())
    assert list(wrapped) == ["a", "b", "c"]


def test_prepare_off_a_terminal_writes_whole_lines(cli, tmp_path: Path, monkeypatch) -> None:
    ticks = iter(range(0, 10_000, 11))  # every reading of the clock 11 s after the last: a line per update
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    (tmp_path / "in.txt").write_text("to be or not to be\n" * 2000)
    code, out, err = cli("prepare", tmp_path / "in.txt", "--tokenizer", "char", "--out", tmp_path / "d")
    assert code == 0, err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n") and lines[-1].startswith("prepared ")
    assert lines[0].startswith("scan: 38.0kB/38.0kB (100%), ")
    assert lines[-2].startswith("encode: 38.0kB/38.0kB (100%), ")
