"""JSON Lines readers: bounded lines, and the failures of Python's json reported as decode errors."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from lmforge import jsonl
from lmforge.data.sft import read_examples
from lmforge.data.sources import open_corpus
from lmforge.errors import LmforgeError
from lmforge.tasks.base import read_eval


@pytest.mark.parametrize(
    ("text", "reason"),
    [("[" * 200_000, "JSON nested too deeply"), ("1" * 5_000, "JSON number has too many digits")],
)
def test_loads_reports_pythons_limits_as_decode_errors(text: str, reason: str) -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        jsonl.loads(text)
    assert str(info.value) == reason and info.value.msg == reason


def test_a_line_over_the_cap_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + b"x" * 101 + b"\n" + b"y" * 100 + b"\n")
    with pytest.raises(LmforgeError, match=r"a.jsonl:2: line longer than 100 bytes"):
        list(jsonl.read_lines(path, max_bytes=100))
    path.write_bytes(b"y" * 100 + b"\n" + b"z" * 100)  # exactly at the cap, with and without a newline
    assert [n for n, _ in jsonl.read_lines(path, max_bytes=100)] == [1, 2]


def test_a_file_without_newlines_is_never_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "' + b"a" * (8 << 20) + b'"}')  # 8 MiB, one line, no newline
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(LmforgeError, match=r"docs.jsonl:1: line longer than 1,048,576 bytes"):
            list(next(open_corpus(str(path)).documents()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize("reader", ["sft", "tasks", "prepare"])
def test_every_jsonl_reader_caps_its_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    path = tmp_path / "data.jsonl"
    record = {"prompt": "p", "completion": " c", "text": "t" * 2000}
    path.write_text(json.dumps(record) + "\n")
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    read = {
        "sft": lambda: read_examples(path, "skip"),
        "tasks": lambda: read_eval(path, None),
        "prepare": lambda: list(next(open_corpus(str(path)).documents())),
    }[reader]
    with pytest.raises(LmforgeError, match="data.jsonl:1: line longer than 1,000 bytes"):
        read()
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 4000)
    read()


def test_task_records_must_be_objects(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a"}\n5\n')
    with pytest.raises(LmforgeError, match="eval.jsonl:2: expected a JSON object"):
        read_eval(tmp_path / "eval.jsonl", None)
