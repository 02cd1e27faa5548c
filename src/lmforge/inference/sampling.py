"""Text generation from a checkpoint, streamed as it is produced: what `lmforge sample` prints.

The rules of generation live here, not in the command line, so that every front end (the
`sample` command, and later chat or a server) starts, checks and stops text the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from lmforge.checkpoint import load_for_inference
from lmforge.data.tokenizer import eot_id, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference.generate import generate
from lmforge.runtime import autocast, resolve_device

SAMPLE_SEPARATOR = "---------------"  # a line of its own between two samples


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen, and how many; checked when made."""

    max_new_tokens: int
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
class Sampler:
    """A checkpoint loaded for generation, with its tokenizer."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    device: torch.device
    dtype: str
    checkpoint: Path | None = None  # the folder it was loaded from

    @classmethod
    def load(cls, target: Path, which: str, device: str, dtype: str, weights: bool = True) -> Sampler:
        """Load checkpoint `which` (best, last, a folder) of `target` onto `device` (auto, cpu, cuda:N);
        without `weights`, its model has none (the meta device): for a process that never runs it."""
        torch_device = resolve_device(device)
        loaded = load_for_inference(target, which, torch_device, weights)
        return cls(loaded.model, load_tokenizer(loaded.tokenizer_file), torch_device, dtype, loaded.path)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens; with no prompt, the start of a document: <|endoftext|>, else a
        newline, else token 0. A prompt the tokenizer cannot represent exactly is refused."""
        if prompt:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            if self.tokenizer.decode(ids, skip_special_tokens=False) != prompt:
                raise LmforgeError("--prompt has characters that this model's tokenizer cannot represent")
            return ids
        eot = eot_id(self.tokenizer)
        newline = self.tokenizer.encode("\n", add_special_tokens=False).ids
        return [eot] if eot is not None else newline[-1:] or [0]

    def complete(
        self,
        prompt_ids: list[int],
        options: SamplingOptions,
        generator: torch.Generator,
        end_of_turn: str = "",
    ) -> Iterator[str]:
        """The continuation of `prompt_ids` as text pieces, each as soon as it decodes to whole
        characters; it ends at <|endoftext|> or after `options.max_new_tokens` tokens. Given a chat
        template's `end_of_turn`, the text is a chat reply (`TextRules.chat_reply`): it ends before
        the end of turn (special tokens count as text), with no blank before it."""
        rules = TextRules.chat_reply(end_of_turn) if end_of_turn else TextRules()
        decoder = TextDecoder(self.tokenizer, rules)
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)

        def pieces() -> Iterator[str]:
            with autocast(self.device, self.dtype):
                for token in generate(
                    self.model,
                    prompt,
                    options.max_new_tokens,
                    options.temperature,
                    options.top_k,
                    options.top_p,
                    generator,
                    stop_token=decoder.eot,
                ):
                    if piece := decoder.feed(int(token[0])):
                        yield piece
                    if decoder.done:
                        return
            if piece := decoder.finish():
                yield piece

        return pieces()


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


class StopScanner:
    """Text fed a piece at a time and released up to the first of `stops`, which may span pieces:
    text that could begin a stop is held back until it cannot, so nothing of a stop is ever
    released. With `reply`, leading whitespace is dropped: a chat reply shows no blank before it,
    and a whitespace stop (`\n`) ends it only once it has begun."""

    def __init__(self, stops: Sequence[str], *, reply: bool = False) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.held = ""  # text that may be the start of a stop
        self.begun = not reply  # text has been released (a reply drops whitespace until then)
        self.stopped = False  # a stop was found: feed no more

    def feed(self, piece: str) -> str:
        """The text that `piece` makes safe to release (possibly none)."""
        held = self.held + piece
        if not self.begun:
            held = held.lstrip()
            self.begun = bool(held)
        found = [at for stop in self.stops if (at := held.find(stop)) >= 0]
        if found:
            self.stopped, self.held = True, ""
            return held[: min(found)]
        keep = max(
            (
                n
                for stop in self.stops
                for n in range(min(len(stop) - 1, len(held)), 0, -1)
                if stop.startswith(held[-n:])
            ),
            default=0,
        )
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def finish(self) -> str:
        """The text held back, released when no more comes: it began a stop that never completed."""
        held, self.held = self.held, ""
        return held


class TextDecoder:
    """Generated token ids turned into text as they come, one token at a time: a token's text is
    released as soon as it decodes to whole characters. <|endoftext|> ends the text, and so does
    any of the `rules`' stops, nothing of which is released. The one decoder of `sample`, `chat`
    and `serve`."""

    def __init__(self, tokenizer: Tokenizer, rules: TextRules = TextRules()) -> None:
        self.tokenizer = tokenizer
        self.eot = eot_id(tokenizer)
        self.stream = DecodeStream(skip_special_tokens=not rules.special_tokens)
        self.scanner = StopScanner(rules.stops, reply=rules.reply)
        self.done = False  # <|endoftext|> or a stop was reached: feed no more

    def feed(self, token: int) -> str:
        """The text that `token` adds (possibly none, e.g. the first byte of a character)."""
        if token == self.eot:
            self.done = True
            return self.scanner.finish()
        piece = self.stream.step(self.tokenizer, token)
        text = self.scanner.feed(piece) if piece else ""
        self.done = self.scanner.stopped
        return text

    def finish(self) -> str:
        """What is held back once no more tokens come (the start of a stop that never completed)."""
        return self.scanner.finish()


def stream_samples(
    target: Path,
    which: str,
    device: str,
    dtype: str,
    *,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    num_samples: int,
) -> Iterator[str]:
    """`num_samples` continuations of `prompt` as text pieces to print in order: each sample is
    the prompt and its continuation, with a separator line between samples and a newline at
    the end. Options, checkpoint and prompt are checked here, before the first piece."""
    options = SamplingOptions(max_new_tokens, temperature, top_k, top_p)
    sampler = Sampler.load(target, which, device, dtype)
    ids = sampler.prompt_ids(prompt)
    # One generator for all samples: each continues the random stream of the one before.
    generator = torch.Generator(device=sampler.device).manual_seed(seed)
    return _samples(sampler, prompt, ids, options, generator, num_samples)


def _samples(
    sampler: Sampler,
    prompt: str,
    prompt_ids: list[int],
    options: SamplingOptions,
    generator: torch.Generator,
    num_samples: int,
) -> Iterator[str]:
    for n in range(num_samples):
        yield prompt
        yield from sampler.complete(prompt_ids, options, generator)
        yield "\n" if n == num_samples - 1 else f"\n{SAMPLE_SEPARATOR}\n"
