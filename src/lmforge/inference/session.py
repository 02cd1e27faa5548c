"""One checkpoint loaded for use: `load` gives the `InferenceSession` that every front end (`sample`,
`chat`, `serve`, `eval`, `audit`, `inspect`, `compare`, `export`) and `train.init_from` work from.

The session holds the model (eval mode, LoRA adapters merged), its tokenizer and chat template, the
device and precision it runs in, and where it came from; a `ModelSource` says which checkpoint to
load, so that a function (or a child process) can load it when it is ready to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.checkpoint import open_checkpoint
from lmforge.config import Config
from lmforge.data.chat_template import ChatTemplate
from lmforge.data.tokenizer import end_ids, eot_id, load_tokenizer, read_end_ids, tokenizable
from lmforge.errors import LmforgeError
from lmforge.inference.generate import generate
from lmforge.inference.sampling import SamplingOptions, TextDecoder, TextRules
from lmforge.inference.weights import build_model
from lmforge.model.gpt import GPT
from lmforge.runtime import DTYPES, autocast, resolve_device, resolve_dtype


@dataclass(frozen=True)
class ModelSource:
    """Which checkpoint to load, onto what device, to run in what precision: a command line's
    checkpoint options as one value, small enough to hand to another process."""

    target: Path  # a run folder or a checkpoint folder
    checkpoint: str = "best"  # best (lowest val loss), last, or a checkpoint folder
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto, fp32, bf16, fp16

    def load(self, *, weights: bool = True, any_head: bool = False) -> InferenceSession:
        """The session of this checkpoint (see `load`). fp16 is refused off CUDA before anything is
        loaded or printed: its autocast runs on CUDA only (`runtime.autocast`)."""
        if self.dtype == "fp16" and (device := resolve_device(self.device, option="--device")).type != "cuda":
            raise LmforgeError(f"--dtype fp16 runs on CUDA only, not on {device}; use bf16 or fp32")
        return load(
            self.target, self.checkpoint, self.device, dtype=self.dtype, weights=weights, any_head=any_head
        )


@dataclass(frozen=True)
class InferenceSession:
    """A checkpoint loaded for use, with everything a front end needs beside the model."""

    model: GPT  # in eval mode, LoRA adapters merged; on the meta device when loaded without weights
    tokenizer: Tokenizer
    template: ChatTemplate  # the checkpoint's chat template, else lmforge's default
    device: torch.device
    dtype: str  # the autocast precision of a forward pass: fp32, bf16 or fp16
    checkpoint: Path  # the checkpoint folder it was loaded from
    step: int
    config: Config  # the run config saved with the checkpoint
    end_ids: tuple[int, ...]  # the tokens that end a completion: the checkpoint's own (an imported
    # model's eos_token_id, `data.tokenizer.read_end_ids`), else <|endoftext|>, else none

    @property
    def tokenizer_file(self) -> Path:
        return self.checkpoint / "tokenizer.json"

    @property
    def source(self) -> ModelSource:
        """What loads this checkpoint again on the same device in the same precision."""
        return ModelSource(self.checkpoint, device=str(self.device), dtype=self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of this session's forward passes (none in fp32)."""
        return autocast(self.device, self.dtype)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens; with no prompt, the start of a document: <|endoftext|>, else a
        newline, else token 0, for an imported model too (its bos_token is not recorded). A prompt
        the tokenizer cannot represent exactly is refused."""
        if prompt:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids if tokenizable(prompt) else []
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
        *,
        end_of_turn: str = "",
    ) -> Iterator[str]:
        """The continuation of `prompt_ids` as text pieces, each as soon as it decodes to whole
        characters; it ends at one of `end_ids` or after `options.max_new_tokens` tokens. Given a chat
        template's `end_of_turn`, the text is a chat reply (`TextRules.chat_reply`): it ends before
        the end of turn (special tokens count as text), with no blank before it."""
        rules = TextRules.chat_reply(end_of_turn) if end_of_turn else TextRules()
        decoder = TextDecoder(self.tokenizer, rules, end_ids=self.end_ids, context=prompt_ids)
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)

        def pieces() -> Iterator[str]:
            with self.autocast():
                for token in generate(
                    self.model,
                    prompt,
                    options.max_new_tokens,
                    temperature=options.temperature,
                    top_k=options.top_k,
                    top_p=options.top_p,
                    generator=generator,
                    stop_tokens=decoder.end_ids,
                ):
                    if piece := decoder.feed(int(token[0])):
                        yield piece
                    if decoder.done:
                        return
            if piece := decoder.finish():
                yield piece

        return pieces()


def load(
    target: Path,
    checkpoint: str = "best",
    device: str = "auto",
    *,
    dtype: str = "auto",
    weights: bool = True,
    any_head: bool = False,
) -> InferenceSession:
    """Checkpoint `checkpoint` (best, last, a folder) of `target` (a run or checkpoint folder),
    verified, checked against its config and loaded onto `device` (auto, cpu, cuda:N), to run in
    `dtype` (auto: bf16 where the device computes it natively, else fp32).

    Without `weights` the model is built on the meta device and nothing is read into it: its
    configuration without its memory, for a process that never runs it (`serve`'s HTTP side). A span
    model (model.head = "span") generates no text: refused unless `any_head`."""
    torch_device = resolve_device(device, option="--device")
    if dtype != "auto" and dtype not in DTYPES:
        raise LmforgeError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    # An explicit dtype stands as asked (resolve_dtype's warning about emulated bf16 speaks to training)
    resolved = resolve_dtype(dtype, torch_device) if dtype == "auto" else dtype
    found = open_checkpoint(Path(target), checkpoint)
    head = found.config.model.head
    if head != "lm" and not any_head:
        raise LmforgeError(
            f'{found.path}: a span model (model.head = "{head}") picks answers out of its prompt '
            "and generates no text; score it with `lmforge eval --task`"
        )
    model = build_model(found, torch_device, weights=weights)
    tokenizer = load_tokenizer(found.tokenizer_file)
    template = ChatTemplate.of_checkpoint(found.path, tokenizer)
    return InferenceSession(
        model=model,
        tokenizer=tokenizer,
        template=template,
        device=torch_device,
        dtype=resolved,
        checkpoint=found.path,
        step=found.step,
        config=found.config,
        end_ids=end_ids(tokenizer, read_end_ids(found.path)),
    )
