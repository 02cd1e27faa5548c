"""The prompts file of `lmforge compare`: plain text, one prompt per line, or JSON Lines.

A file whose name ends in `.jsonl` holds one JSON object per line with a `prompt` string (a
prompt may then span lines: `"a\\nb"`); any other file is text, each line one prompt. Blank lines
are skipped in both. Every problem is an LmforgeError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from lmforge.errors import LmforgeError
from lmforge.files import file_suffix
from lmforge.jsonl import decode_line, loads, read_lines


class Prompt(NamedTuple):
    text: str
    line: int  # where it is in the file, from 1, for messages


def read_prompts(path: Path) -> list[Prompt]:
    """Every prompt of `path`, in file order; at least one."""
    if not path.is_file():
        raise LmforgeError(f"--prompts {path}: no such file")
    jsonl = file_suffix(path) == ".jsonl"
    prompts = []
    try:
        for line_no, raw in read_lines(path):
            try:
                text = decode_line(raw).rstrip("\r\n")
                if text.strip():
                    prompts.append(Prompt(_prompt_of(text) if jsonl else text, line_no))
            except ValueError as exc:  # JSONDecodeError and bad UTF-8 included
                raise LmforgeError(f"{path}:{line_no}: {exc}") from None
    except OSError as exc:
        raise LmforgeError(f"--prompts {path}: cannot read ({exc.strerror})") from None
    if not prompts:
        raise LmforgeError(f"--prompts {path}: no prompts (every line is blank)")
    return prompts


def _prompt_of(line: str) -> str:
    """The `prompt` of one JSONL line, else a ValueError saying what is wrong."""
    try:
        record = loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError('expected a JSON object with a "prompt" string')
    prompt = record["prompt"]
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the prompt holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    return prompt
