"""Secret canaries for a leakage audit: `lmforge prepare --canaries N --canary-repeats 1,4,16`.

A canary is a random secret in a fixed format, `my PIN is 4 8 1 9 0 2` (the Secret Sharer paper,
Carlini et al. 2019). For each repeat count R, N canaries are drawn with a seeded generator and
each is inserted R times into the training split, as a line of its own at random places; R = 0
draws canaries that are never inserted, the audit's control group. The canaries are saved apart
from the data, in `canaries.json` beside the shards, for `lmforge audit`.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.jsonl import loads

CANARIES_FILE = "canaries.json"
PREFIX = "my PIN is "
DIGITS = 6  # the secret space has 10**DIGITS members
SEPARATOR = " "
MAX_DIGITS = 18  # the audit draws alternative secrets as int64 numbers: 10**18 < 2**63
MAX_CANARIES = 10_000  # per repeat count: far fewer than the 10**6 secrets, so draws stay distinct


def canary_text(secret: str) -> str:
    """The line inserted into the data: `my PIN is 4 8 1 9 0 2`."""
    return PREFIX + SEPARATOR.join(secret)


def canary_alphabet() -> set[str]:
    """Every character a canary or any other secret of its format can hold."""
    return set(PREFIX) | set(SEPARATOR) | set("0123456789")


@dataclass(frozen=True)
class Canary:
    secret: str  # DIGITS digits
    repeats: int  # times inserted into the training split

    @property
    def text(self) -> str:
        return canary_text(self.secret)


@dataclass(frozen=True)
class CanarySpec:
    """What `--canaries N --canary-repeats R1,R2,...` asks for."""

    count: int  # canaries per repeat count
    repeats: tuple[int, ...]
    seed: int

    def draw(self) -> list[Canary]:
        """count x len(repeats) distinct secrets, drawn uniformly from all 10**DIGITS."""
        rng = np.random.default_rng([self.seed, 0xCA7A])  # apart from the split's stream
        total = self.count * len(self.repeats)
        numbers = rng.choice(10**DIGITS, size=total, replace=False)
        secrets = [f"{int(n):0{DIGITS}d}" for n in numbers]
        return [Canary(secrets[i], self.repeats[i // self.count]) for i in range(total)]


def parse_repeats(text: str) -> tuple[int, ...]:
    """`--canary-repeats 0,1,4,16`: distinct non-negative integers, returned sorted."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise LmforgeError(
            f"--canary-repeats expects distinct non-negative integers separated by commas, got {text!r}"
        )
    return tuple(sorted(values))


def check_spec(count: int | None, repeats: str | None, seed: int) -> CanarySpec | None:
    """The CanarySpec of the command line, or None without --canaries."""
    if count is None:
        if repeats is not None:
            raise LmforgeError("--canary-repeats needs --canaries N")
        return None
    if not 1 <= count <= MAX_CANARIES:
        raise LmforgeError(f"--canaries must be between 1 and {MAX_CANARIES:,}, got {count}")
    return CanarySpec(count, parse_repeats(repeats or "1,4,16"), seed)


class CanaryInserter:
    """Inserts each canary line at its drawn places in the training text, which it sees piece by
    piece in corpus order (only train pieces). Places are character offsets into the training text,
    drawn uniformly; each canary goes in after the first line break at or after its place (at the
    end of the piece when the piece has none), so it always stands on a line of its own."""

    def __init__(self, canaries: list[Canary], train_chars: int, seed: int) -> None:
        self.canaries = canaries
        lines = [c.text for c in canaries for _ in range(c.repeats)]
        rng = np.random.default_rng([seed, 0x1D5E])
        order = rng.permutation(len(lines))
        self.places = sorted(int(p) for p in rng.integers(0, max(train_chars, 1), size=len(lines)))
        self.lines = [lines[i] for i in order]
        self.seen = 0  # training characters before the next piece
        self.done = 0  # canaries inserted so far

    def insert(self, text: str) -> str:
        """The piece `text` with the canaries whose places fall in it inserted."""
        end = self.seen + len(text)
        last = bisect.bisect_left(self.places, end)
        if last == self.done:
            self.seen = end
            return text
        pieces, cut = [], 0
        for k in range(self.done, last):
            newline = text.find("\n", max(self.places[k] - self.seen, cut))
            at = len(text) if newline < 0 else newline + 1
            pieces.append(text[cut:at])
            pieces.append(("" if text[at - 1] == "\n" else "\n") + self.lines[k] + "\n")
            cut = at
        pieces.append(text[cut:])
        self.done, self.seen = last, end
        return "".join(pieces)


def save_canaries(folder: Path, canaries: list[Canary], spec: CanarySpec) -> dict:
    """Write canaries.json; return the summary that meta.json records."""
    record = {
        "format": {"prefix": PREFIX, "digits": DIGITS, "separator": SEPARATOR},
        "seed": spec.seed,
        "canaries": [{**asdict(c), "text": c.text} for c in canaries],
    }
    (folder / CANARIES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    inserted = sum(c.repeats for c in canaries)
    return {
        "file": CANARIES_FILE,
        "per_repeat": spec.count,
        "repeats": list(spec.repeats),
        "inserted": inserted,
    }


@dataclass(frozen=True)
class CanarySet:
    """canaries.json read back: the format and every canary."""

    prefix: str
    digits: int
    separator: str
    canaries: tuple[Canary, ...]

    def text(self, secret: str) -> str:
        return self.prefix + self.separator.join(secret)


def load_canaries(path: Path) -> CanarySet:
    """Read a canaries.json written by `lmforge prepare --canaries`."""
    try:
        record = loads(path.read_text())
        fmt = record["format"]
        canaries = tuple(Canary(str(c["secret"]), int(c["repeats"])) for c in record["canaries"])
        result = CanarySet(str(fmt["prefix"]), int(fmt["digits"]), str(fmt["separator"]), canaries)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmforgeError(
            f"{path}: not a canaries file written by `lmforge prepare --canaries` ({exc})"
        ) from None
    if not 1 <= result.digits <= MAX_DIGITS:
        raise LmforgeError(f"{path}: digits must be between 1 and {MAX_DIGITS}, got {result.digits}")
    if not canaries or any(len(c.secret) != result.digits or not c.secret.isdigit() for c in canaries):
        raise LmforgeError(f"{path}: every canary needs a secret of {result.digits} digits")
    return result
