"""Text generation from a checkpoint, streamed as it is produced: what `lmforge sample` prints.

The rules of generation live here, not in the command line, so that every front end (the
`sample` command, and later chat or a server) starts, checks and stops text the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from lmforge.checkpoint import load_for_inference
from lmforge.data.tokenizer import eot_id, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.model.generate import generate
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
    def load(cls, target: Path, which: str, device: str, dtype: str) -> Sampler:
        """Load checkpoint `which` (best, last, a folder) of `target` onto `device` (auto, cpu, cuda:N)."""
        torch_device = resolve_device(device)
        loaded = load_for_inference(target, which, torch_device)
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
        self, prompt_ids: list[int], options: SamplingOptions, generator: torch.Generator, stop_text: str = ""
    ) -> Iterator[str]:
        """The continuation of `prompt_ids` as text pieces, each as soon as it decodes to whole
        characters; it ends at <|endoftext|>, before `stop_text` (special tokens then count as
        text: a chat's end of turn may be one), or after `options.max_new_tokens` tokens."""
        eot = eot_id(self.tokenizer)
        stream = DecodeStream(skip_special_tokens=not stop_text)
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
                    stop_token=eot,
                ):
                    if int(token[0]) == eot:
                        return
                    if piece := stream.step(self.tokenizer, int(token[0])):
                        yield piece

        return until_stop(pieces(), stop_text) if stop_text else pieces()


def until_stop(pieces: Iterable[str], stop: str) -> Iterator[str]:
    """`pieces` up to the first `stop`, which may span pieces: text that could begin it is held
    back until it cannot, so nothing of `stop` is ever yielded. Stops reading there. A stop that
    is whitespace (`\n`) counts only once the text has begun: leading whitespace is dropped."""
    held, begun = "", not stop.isspace()
    for piece in pieces:
        held += piece
        if not begun:
            held = held.lstrip()
            begun = bool(held)
        if (at := held.find(stop)) >= 0:
            if at:
                yield held[:at]
            return
        keep = next((n for n in range(min(len(stop) - 1, len(held)), 0, -1) if stop.startswith(held[-n:])), 0)
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep :]
    if held:
        yield held


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
