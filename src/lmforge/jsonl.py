"""JSON and JSON Lines from users' files, failing only with errors that name what is wrong.

Python's `json` has failures besides `JSONDecodeError` on hostile input: deep nesting raises
`RecursionError` and an integer past the interpreter's digit limit a bare `ValueError`. `loads`
turns both into `JSONDecodeError`, so every reader reports them as it reports malformed JSON.
`read_lines` reads a file a line at a time with a cap on the line length, so a file without
newlines cannot be read whole into memory. Nothing here imports torch: the CLI loads it early.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

# Longest JSONL line read: far above any real record (a long document or chat), low enough that a
# file without newlines is refused rather than read whole.
MAX_LINE_BYTES = 64 << 20


class JsonLimitError(json.JSONDecodeError):
    """Input beyond what Python's json will parse (deep nesting, a huge integer), as a decode error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "", 0)

    def __str__(self) -> str:  # no line/column: the limit is a property of the whole document
        return self.msg

    def __reduce__(self) -> tuple:
        return type(self), (self.msg,)


def loads(text: str) -> Any:
    """`json.loads`, raising only `JSONDecodeError` (a ValueError) whatever the input."""
    try:
        return json.loads(text)
    except RecursionError:
        raise JsonLimitError("JSON nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise JsonLimitError("JSON number has too many digits") from None


def read_json_object(path: Path) -> dict:
    """A JSON object file (a Hugging Face folder's config, a checkpoint's generation_config.json);
    {} when there is none; a one-line error naming the file for anything but a JSON object."""
    if not path.is_file():
        return {}
    try:
        content = loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LmforgeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(content, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return content


def read_lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) of a file, read one bounded line at a time.

    A line longer than `max_bytes` (default MAX_LINE_BYTES, read at call time so tests can lower
    it) is an LmforgeError naming the file and line; memory never holds more than that. A UTF-8 byte
    order mark before the first line (Windows editors write one) is dropped, as utf-8-sig does.
    """
    limit = MAX_LINE_BYTES if max_bytes is None else max_bytes
    with open(path, "rb") as f:
        line_no = 0
        while line := f.readline(limit + 1):
            line_no += 1
            if line_no == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]
            if len(line) > limit and not line.endswith(b"\n"):  # more than `limit` bytes before the newline
                raise LmforgeError(f"{path}:{line_no}: line longer than {limit:,} bytes (is it JSON Lines?)")
            yield line_no, line


def decode_line(line: bytes, errors: str = "strict") -> str:
    """A raw line as text; invalid UTF-8 is a ValueError giving the byte offset in the line."""
    try:
        return line.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start} of the line") from None
