"""Held-out lines for membership inference: `lmforge prepare --holdout-lines N`.

A membership test must draw its members and non-members from the same distribution, or it measures
the difference between them instead of membership. The val split is not such a sample when it is
the corpus's tail (TinyShakespeare's last plays: other characters, other words). So prepare picks
lines of the *training* text at random and, by a coin per line, keeps each in the train split (a
member) or takes it out of the data altogether (held out: never trained on, in no split). Both
lists go to `membership.json` beside the shards, for `lmforge audit`.

A line's fate is a seeded hash of its text, so every copy of a text shares it: a held-out line has
no copy left in the train split. Lines shorter than `MIN_LINE_CHARS` (blank lines, speakers' names)
are never picked: they repeat too often to belong to one side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.jsonl import loads

MEMBERSHIP_FILE = "membership.json"
MIN_LINE_CHARS = 20  # stripped characters a line needs to be picked
MAX_HOLDOUT_LINES = 100_000  # per side; a test of more lines takes hours, not minutes
MEMBER, HELD_OUT = "member", "held_out"


def eligible_lines(text: str) -> int:
    """Lines of `text` long enough to be picked (the first pass counts them to set the odds)."""
    return sum(len(line.strip()) >= MIN_LINE_CHARS for line in text.split("\n"))


def check_holdout_lines(count: int | None) -> int | None:
    """`--holdout-lines N`: None (none held out) or 1 to MAX_HOLDOUT_LINES."""
    if count is not None and not 1 <= count <= MAX_HOLDOUT_LINES:
        raise LmforgeError(f"--holdout-lines must be between 1 and {MAX_HOLDOUT_LINES:,}, got {count}")
    return count


class LineHoldout:
    """Takes the held-out lines out of the training text, which it sees piece by piece in corpus
    order (train pieces only), and records them beside the lines picked as members. Each line is
    picked with probability `fraction` (half of those held out, half members); lines in `never`
    (the canaries) are left alone."""

    def __init__(self, fraction: float, seed: int, never: frozenset[str] = frozenset()) -> None:
        self.fraction, self.seed, self.never = fraction, seed, never
        self.picked: dict[str, dict[str, None]] = {MEMBER: {}, HELD_OUT: {}}  # ordered sets of texts
        self.at_line_start = True  # the text seen so far ended a line

    @classmethod
    def for_count(cls, count: int, train_lines: float, *, seed: int, never: frozenset[str]) -> LineHoldout:
        """A holdout that picks about `count` lines for each side out of `train_lines` eligible ones."""
        return cls(min(1.0, 2 * count / max(train_lines, 1.0)), seed, never)

    def fate(self, line: str) -> str | None:
        """MEMBER, HELD_OUT or None (not picked), the same for every copy of the text."""
        if len(line.strip()) < MIN_LINE_CHARS or line in self.never:
            return None
        digest = hashlib.blake2b(f"holdout {self.seed}\n{line}".encode(), digest_size=8).digest()
        draw = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        if draw >= self.fraction:
            return None
        return HELD_OUT if draw < self.fraction / 2 else MEMBER

    def take(self, text: str) -> str:
        """`text` without its held-out lines. Only whole lines are picked: the first line of a piece
        counts only if the text before it ended a line, the last only if a line break ends it."""
        lines = text.split("\n")
        kept = []
        for i, line in enumerate(lines):
            whole = i < len(lines) - 1 and (i > 0 or self.at_line_start)
            fate = self.fate(line) if whole else None
            if fate is not None:
                self.picked[fate][line] = None
            if fate != HELD_OUT:
                kept.append(line)
        if text:
            self.at_line_start = text.endswith("\n")
        return "\n".join(kept)

    def save(self, folder: Path) -> dict:
        """Write membership.json; return the summary that meta.json records."""
        record = {
            "seed": self.seed,
            "min_chars": MIN_LINE_CHARS,
            "fraction": self.fraction,
            "members": list(self.picked[MEMBER]),
            "held_out": list(self.picked[HELD_OUT]),
        }
        text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
        (folder / MEMBERSHIP_FILE).write_text(text, encoding="utf-8")  # as load_membership reads it
        counts = {side: len(record[side]) for side in ("members", "held_out")}
        return {"file": MEMBERSHIP_FILE, **counts}


@dataclass(frozen=True)
class MembershipLines:
    """membership.json read back: lines trained on and lines held out, drawn alike."""

    members: tuple[str, ...]
    held_out: tuple[str, ...]


def load_membership(path: Path) -> MembershipLines:
    """Read a membership.json written by `lmforge prepare --holdout-lines`."""
    try:
        record = loads(path.read_text(encoding="utf-8"))
        sides = [record[side] for side in ("members", "held_out")]
        if not all(isinstance(side, list) and all(isinstance(x, str) for x in side) for side in sides):
            raise TypeError("'members' and 'held_out' must be lists of lines")  # a string is no list of lines
        lines = MembershipLines(tuple(sides[0]), tuple(sides[1]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmforgeError(
            f"{path}: not a membership file written by `lmforge prepare --holdout-lines` ({exc})"
        ) from None
    if not lines.members or not lines.held_out:
        raise LmforgeError(f"{path}: needs at least one member and one held-out line")
    return lines
