"""Helpers for the task tests: a character set that covers the toy tasks, task folders."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöüß .,:;!?'-\n0123456789"

# Paragraphs that each repeat exactly one span a cloze question can blank (the others are function
# words or appear once), keyed by that span.
CLOZE_PARAGRAPHS = {
    "Captain Ahab": "Captain Ahab paced the deck at night. The crew feared Captain Ahab more than the sea.",
    "lighthouse": "The lighthouse stood on the rock. Every sailor knew the lighthouse by its red light.",
    "Elizabeth Bennet": "Elizabeth Bennet laughed at the letter. Nobody could vex Elizabeth Bennet.",
    "garden": "The garden was quiet in the morning. Birds came down to the garden to drink.",
    "violin": "He took the violin from its case. It was an old violin with a cracked neck.",
    "Paris": "They reached Paris in the spring. The streets of Paris were full of music.",
}
CLOZE_BOOK = "\n\n".join(CLOZE_PARAGRAPHS.values())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "eval"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
