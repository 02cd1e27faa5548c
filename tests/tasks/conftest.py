"""Helpers for the task tests: a character set that covers the toy tasks, task folders."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöüß .,:;!?'-\n0123456789"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "eval"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
