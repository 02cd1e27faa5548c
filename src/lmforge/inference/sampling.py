"""The rules of generation that every front end (`sample`, `chat`, `serve`, `compare`) shares, so that
each starts, checks and stops text the same way: the sampling options, and how generated tokens become
text (stop strings, special tokens, a chat reply's leading blank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen, and how many; checked when made."""

    max_new_tokens: int | None  # None only on its way to a front end that fills in its default (compare)
    temperature: float  # 0 is greedy
    top_k: int | None
    top_p: float | None

    def __post_init__(self) -> None:
        # Written so that NaN fails every test: `nan < 0` is False, `not 0 <= nan` is True.
        if not 0 <= self.temperature < math.inf:
            raise LmforgeError(f"--temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LmforgeError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class TextRules:
    """How generated tokens become text: where it ends and what of it is shown."""

    stops: tuple[str, ...] = ()  # the text ends before the first of these, none of which is shown
    special_tokens: bool = False  # special tokens are text (a chat's end of turn may be one); else skipped
    reply: bool = False  # a chat reply: no blank before it (leading whitespace dropped, so a stop counts
    # only once the reply has begun); a plain continuation is shown exactly as the model wrote it

    @classmethod
    def chat_reply(cls, end_of_turn: str, stops: Sequence[str] = ()) -> TextRules:
        """A reply through a chat template: it ends at the template's end of turn or one of `stops`."""
        return cls((*stops, end_of_turn) if end_of_turn else tuple(stops), special_tokens=True, reply=True)


CONTEXT_TOKENS = 8  # the prompt's last tokens that a TextDecoder reads before the continuation


class StopScanner:
    """Text fed a piece at a time and released up to the first of `stops`, which may span pieces:
    text that could begin a stop is held back until it cannot, so nothing of a stop is ever
    released. With `reply`, leading whitespace is dropped: a chat reply shows no blank before it,
    and a whitespace stop (`\n`) ends it only once it has begun.

    Each stop is matched as Knuth-Morris-Pratt does, one new character at a time, from how much of
    it the text so far ends with: a piece costs work in its own length, never in the length of the
    text before it or of a stop that text half matches (searching the held text for each stop and
    each of its beginnings, at every piece, cost a long stop the square of its length per token)."""

    def __init__(self, stops: Sequence[str], *, reply: bool = False) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.fallbacks = [_fallbacks(stop) for stop in self.stops]
        self.matched = [0] * len(self.stops)  # of each stop: how much the text so far ends with
        self.held = ""  # text that may be the start of a stop: its longest `matched`
        self.begun = not reply  # text has been released (a reply drops whitespace until then)
        self.stopped = False  # a stop was found: feed no more

    def feed(self, piece: str) -> str:
        """The text that `piece` makes safe to release (possibly none)."""
        held = self.held + piece
        if not self.begun:  # nothing is held before a reply begins: all of `held` is new
            held = piece = held.lstrip()
            self.begun = bool(held)
        new = len(held) - len(piece)
        ends = [self._match(i, held, new) for i in range(len(self.stops))]
        starts = [end - len(stop) for end, stop in zip(ends, self.stops) if end is not None]
        if starts:
            self.stopped, self.held = True, ""
            return held[: min(starts)]
        keep = max(self.matched, default=0)
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def _match(self, i: int, text: str, start: int) -> int | None:
        """Stop `i` matched on through `text[start:]`: the end of its first whole match, if any."""
        stop, fallbacks, matched = self.stops[i], self.fallbacks[i], self.matched[i]
        for at in range(start, len(text)):
            char = text[at]
            while matched and stop[matched] != char:
                matched = fallbacks[matched - 1]
            if stop[matched] == char:
                matched += 1
            if matched == len(stop):
                return at + 1
        self.matched[i] = matched
        return None

    def finish(self) -> str:
        """The text held back, released when no more comes: it began a stop that never completed."""
        held, self.held = self.held, ""
        return held


def _fallbacks(stop: str) -> list[int]:
    """KMP's failure function: for each n, the longest proper beginning of stop[:n + 1] that it ends with."""
    fallbacks, matched = [0] * len(stop), 0
    for at in range(1, len(stop)):
        while matched and stop[matched] != stop[at]:
            matched = fallbacks[matched - 1]
        if stop[matched] == stop[at]:
            matched += 1
        fallbacks[at] = matched
    return fallbacks


class TextDecoder:
    """Generated token ids turned into text as they come, one token at a time: a token's text is
    released as soon as it decodes to whole characters. Any of `end_ids` (the session's: the model's
    end-of-text tokens) ends the text, and so does any of the `rules`' stops, nothing of which is
    released. The one decoder of `sample`, `chat` and `serve`.

    `context` (the prompt's ids) is decoded first and its text left out, so that each token reads as
    it does after the prompt: SentencePiece's decoders (Llama 2, Mistral, Phi-3) strip the space of
    a text's first word, which alone made "The capital is" + "▁Paris" "The capital isParis"."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        rules: TextRules = TextRules(),
        *,
        end_ids: Sequence[int],
        context: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.end_ids = frozenset(end_ids)
        skip_special_tokens = not rules.special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        tail = list(context[-CONTEXT_TOKENS:])
        # a prompt that ends inside a character (or with U+FFFD) would leave its bytes in the stream,
        # to come out with the first token's text: such a continuation is decoded on its own
        if tail and not tokenizer.decode(tail, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            for token in tail:
                self.stream.step(tokenizer, token)
        self.scanner = StopScanner(rules.stops, reply=rules.reply)
        self.done = False  # an end id or a stop was reached: feed no more

    def feed(self, token: int) -> str:
        """The text that `token` adds (possibly none, e.g. the first byte of a character)."""
        if token in self.end_ids:
            self.done = True
            return self.scanner.finish()
        piece = self.stream.step(self.tokenizer, token)
        text = self.scanner.feed(piece) if piece else ""
        self.done = self.scanner.stopped
        return text

    def finish(self) -> str:
        """What is held back once no more tokens come (the start of a stop that never completed)."""
        return self.scanner.finish()
