"""Personal data out of a corpus before it is tokenized: `lmforge prepare --scrub-pii`.

Each kind is a compiled regular expression for candidates and, where the format has one, a check
that a real value passes: payment cards the Luhn checksum, IBANs the ISO 13616 mod-97 checksum, IP
addresses the `ipaddress` parser. A candidate that fails its check stays in the text (a 16-digit
order number is not a card). Every kind is written out in ASCII forms only: `user at example dot
com` and other spelled-out or obfuscated forms stay, by design.

Text is scanned left to right; at each position the earliest valid candidate of any kind wins (ties
go to the kind listed first in `KINDS`) and becomes its placeholder, e.g. `<EMAIL>`. `Scrubber`
does the same over a stream of chunks, keeping back only the unfinished last line, so memory stays
bounded and the result does not depend on where the chunks were cut.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from lmforge.errors import LmforgeError

KINDS = ("url", "email", "iban", "card", "ip", "phone")  # ties at one position go to the earlier kind
PLACEHOLDERS = {
    "url": "<URL>",
    "email": "<EMAIL>",
    "iban": "<IBAN>",
    "card": "<CARD>",
    "ip": "<IP>",
    "phone": "<PHONE>",
}
MAX_BOUNDED_MATCH = 64  # the longest match of every kind but url and email (which hold no whitespace)
MAX_CARRY = 1 << 16  # characters of a line kept back at most before it is cut at a safe space
CONTEXT = 16  # characters before a chunk that the patterns' lookbehinds may need (at most 10)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not in the first groups of an IBAN whose checksum failed (later groups follow a digit and a space).
_NOT_IN_IBAN = r"(?<![A-Z]{2}\d\d )(?<![A-Z]{2}\d\d [A-Z0-9]{4} )"
_PATTERNS = {
    # A scheme or www., then anything but whitespace, quotes and brackets, not ending in punctuation.
    "url": r"(?<![\w@])(?:(?:https?|ftp)://|www\.)[^\s<>\"'()\[\]{}]*[^\s<>\"'()\[\]{}.,;:!?]",
    "email": r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])",
    # Country code, check digits, then the BBAN in groups of four, optionally space-separated.
    "iban": r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?!\w)",
    # 13-19 digits, plain or in fours with one separator throughout; or Amex's 4-6-5.
    "card": r"(?<![\w+.-])(?<!\d[ -])"
    + _NOT_IN_IBAN
    + r"(?:\d{4}(?P<sep>[ -]?)\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{1,3})?"
    + r"|\d{4}[ -]\d{6}[ -]\d{5})(?!\w)(?![ -]\d)",
    # IPv4, or IPv6 (compressed, or ending in an IPv4 address as in ::ffff:192.0.2.1).
    "ip": rf"(?<![\w.:])(?:(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\d)(?!\w)"
    rf"|(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:(?:{_OCTET}\.){{3}}{_OCTET}|[0-9A-Fa-f]{{0,4}})(?![\w:])(?!\.\d))",
    # +country code then groups of digits; or an (area code) then groups; or North America's trunk
    # prefix 1 before 3-3-4 (1-800-555-0199); or 3-6 groups of 2-4 digits. Never right after a digit
    # and a separator (the tail of a longer number). The check counts digits.
    "phone": r"(?<![\w+/.-])(?<!\d[ .-])"
    + _NOT_IN_IBAN
    + r"(?:\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,8}(?:[ .-]\d{1,8}){0,5}"
    + r"|\(\d{1,4}\)[ .-]?\d{2,8}(?:[ .-]\d{2,8}){0,4}"
    + r"|1(?P<trunk>[ .-])\d{3}(?P=trunk)\d{3}(?P=trunk)\d{4}"
    + r"|\d{2,4}(?:[ .-]\d{2,4}){2,5})(?!\w)(?![ .-]\d)",
}
_COMPILED = {kind: re.compile(pattern) for kind, pattern in _PATTERNS.items()}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of payment card numbers (every second digit from the right doubled)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: 15-34 characters; moved the first four to the end, letters as 10-35, mod 97 is 1."""
    iban = iban.replace(" ", "")
    if not 15 <= len(iban) <= 34 or not iban[:2].isalpha() or not iban[2:4].isdigit():
        return False
    number = "".join(str(int(ch, 36)) for ch in iban[4:] + iban[:4])
    return int(number) % 97 == 1


def _card_end(match: re.Match) -> int | None:
    digits = re.sub(r"\D", "", match.group())
    return match.end() if 13 <= len(digits) <= 19 and luhn_valid(digits) else None


def _iban_end(match: re.Match) -> int | None:
    """The candidate's end if it is a valid IBAN, or once without a last group of capitals (a word in
    capitals that follows, which the pattern may have taken)."""
    text = match.group()
    if iban_valid(text):
        return match.end()
    head, _, last = text.rpartition(" ")
    return match.start() + len(head) if head and last.isalpha() and iban_valid(head) else None


def _ip_end(match: re.Match) -> int | None:
    text = match.group()
    if ":" in text and text != "::1":
        if sum(c not in ":." for c in text) < 4:
            return None  # "::" and "a::b" in text are punctuation and code more often than addresses
        if "." not in text and all(g.isdigit() and len(g) < 4 for g in text.split(":") if g):
            return None  # "243:256::81", a proportion (a : b :: c : d): no hex letter, no 4-digit group
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return match.end()


def _phone_end(match: re.Match) -> int | None:
    """With + or (area code): 7-15 digits. Without: one separator throughout and 9-12 digits (so dates
    like 2024-01-15, times and prices stay); with dots only North America's (1.)3-3-4 (not a bad IPv4)."""
    text = match.group()
    digits = sum(c.isdigit() for c in text)
    if text.startswith(("+", "(")):
        return match.end() if 7 <= digits <= 15 else None
    separators = set(re.findall(r"[ .-]", text))
    if separators == {"."}:
        return match.end() if re.fullmatch(r"(?:1\.)?\d{3}\.\d{3}\.\d{4}", text) else None
    return match.end() if len(separators) == 1 and 9 <= digits <= 12 else None


_CHECKS: dict[str, Callable[[re.Match], int | None]] = {
    "url": lambda m: m.end(),
    "email": lambda m: m.end(),
    "iban": _iban_end,
    "card": _card_end,
    "ip": _ip_end,
    "phone": _phone_end,
}


def parse_kinds(text: str | None) -> tuple[str, ...]:
    """`--scrub-pii` KINDS: "all" or a comma-separated subset of KINDS, returned in KINDS order."""
    if text is None:
        return ()
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return KINDS
    unknown = [name for name in names if name not in KINDS]
    if unknown or not names:
        raise LmforgeError(
            f"--scrub-pii: unknown kind {unknown[0] if unknown else text!r} "
            f"(expected 'all' or a comma-separated list of {', '.join(KINDS)})"
        )
    return tuple(kind for kind in KINDS if kind in names)


@dataclass(frozen=True)
class Found:
    """One piece of personal data: its kind and span in the text."""

    kind: str
    start: int
    end: int


def find_pii(text: str, kinds: Iterable[str] = KINDS, start: int = 0) -> list[Found]:
    """Every valid match of `kinds` in `text` from `start` on, left to right, without overlaps (the
    text before `start` is context for the patterns' lookbehinds)."""
    order = [kind for kind in KINDS if kind in set(kinds)]
    found: list[Found] = []
    pos = start
    candidates = {kind: _COMPILED[kind].search(text, start) for kind in order}
    while True:
        best: Found | None = None
        for kind in order:
            match, end = candidates[kind], None
            while match is not None:
                end = _CHECKS[kind](match) if match.start() >= pos else None
                if end is not None:
                    break
                match = _COMPILED[kind].search(text, max(pos, match.start() + 1))
            candidates[kind] = match
            if match is not None and (best is None or match.start() < best.start):
                best = Found(kind, match.start(), end)
        if best is None:
            return found
        found.append(best)
        pos = best.end


class Scrubber:
    """Replaces personal data with placeholders, chunk by chunk, and counts what it replaced."""

    def __init__(self, kinds: Iterable[str] = KINDS, max_carry: int = MAX_CARRY) -> None:
        self.kinds = tuple(kind for kind in KINDS if kind in set(kinds))
        self.counts = dict.fromkeys(self.kinds, 0)
        self.max_carry = max_carry
        self._carry = ""
        self._context = ""  # the end of the document's text scrubbed so far, unscrubbed

    def scrub(self, text: str) -> str:
        """`text`, a whole text, with every match replaced by its placeholder (counted)."""
        self._context = ""
        return self._scrub_next(text)

    def _scrub_next(self, text: str, following: str = "") -> str:
        """Scrub the next piece of a document: the patterns see the end of the piece before and, for
        their lookaheads, `following`, the text after a piece cut inside a line (no match crosses it)."""
        whole = self._context + text
        pieces, last = [], len(self._context)
        for found in find_pii(whole + following, self.kinds, start=last):
            if found.start >= len(whole):
                break
            pieces += [whole[last : found.start], PLACEHOLDERS[found.kind]]
            self.counts[found.kind] += 1
            last = found.end
        pieces.append(whole[last:])
        self._context = whole[-CONTEXT:]
        return "".join(pieces)

    def feed(self, chunk: str) -> str:
        """Scrub the complete lines of what came so far; keep the last, unfinished line for later."""
        buffer = self._carry + chunk
        cut = buffer.rfind("\n") + 1  # no kind matches across a line break
        if cut > 0 or len(buffer) <= self.max_carry:
            self._carry = buffer[cut:]
            return self._scrub_next(buffer[:cut])
        cut = self._safe_cut(buffer)  # at least 64 characters from the end, at a space: few more
        self._carry = buffer[cut:]
        # "0958 2..." is no phone number in one pass: the lookaheads must see past the cut
        return self._scrub_next(buffer[:cut], following=self._carry)

    def finish(self) -> str:
        """Scrub and return what was kept back (the end of a document)."""
        text, self._carry = self._carry, ""
        return self._scrub_next(text)

    def stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """The scrubbed text of one document, as non-empty chunks."""
        self._carry = self._context = ""
        for chunk in chunks:
            if text := self.feed(chunk):
                yield text
        if text := self.finish():
            yield text

    def _safe_cut(self, buffer: str) -> int:
        """A place to cut a long line: after a space or tab outside every match, far enough from the
        end that no bounded match can cross it (url and email hold no whitespace). A line without
        such a space is cut there anyway, or before the match that crosses there."""
        shift = len(self._context)
        spans = [
            Found(f.kind, f.start - shift, f.end - shift)
            for f in find_pii(self._context + buffer, self.kinds, shift)
        ]
        limit = len(buffer) - MAX_BOUNDED_MATCH
        for i in range(limit, 0, -1):
            if buffer[i - 1] in " \t" and not any(f.start < i < f.end for f in spans):
                return i
        crossing = [f for f in spans if f.start < limit < f.end]
        return crossing[0].start if crossing and crossing[0].start > 0 else limit


def count_summary(counts: dict[str, int]) -> str:
    """`3 email, 0 phone, ...` for the prepare summary."""
    return ", ".join(f"{n:,} {kind}" for kind, n in counts.items())
