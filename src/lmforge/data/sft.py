"""Supervised fine-tuning data: prompt/completion (or chat) JSONL with the prompt masked out.

Every example is tokenized once at start-up. Targets of prompt tokens are IGNORE_INDEX, which
`cross_entropy` ignores, so only completion tokens (and the `<|endoftext|>` that ends them,
when the tokenizer has one) contribute to the loss. Batches are padded to their longest
example; right padding cannot affect earlier positions under causal attention.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.data.protocol import Batch
from lmforge.data.tokenizer import eot_id, load_tokenizer, vocab_size
from lmforge.errors import LmforgeError
from lmforge.jsonl import decode_line, loads, read_lines
from lmforge.model.gpt import IGNORE_INDEX

LENGTH_MULTIPLE = 16  # padded batch lengths are multiples of this
CHAT_TURN = "{role}: {content}\n"  # chat messages are rendered turn by turn; the last one is the completion


@dataclass(frozen=True)
class Example:
    """One tokenized example: prompt ids, then completion ids."""

    ids: list[int]
    prompt_tokens: int  # how many leading ids are prompt (masked)


def render_messages(messages: object) -> tuple[str, str]:
    """Chat `messages` → (prompt, completion): every turn but the last, which must be the assistant's."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise ValueError("'messages' must be a non-empty list of {role, content} strings")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    prompt = "".join(CHAT_TURN.format(**m) for m in messages[:-1]) + "assistant:"
    return prompt, " " + messages[-1]["content"]


def read_examples(path: Path, on_bad_line: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSONL file; bad lines raise or are skipped with a count."""
    if not path.is_file():
        raise LmforgeError(f"{path}: not found")
    pairs, skipped = [], 0
    for line_no, raw in read_lines(path):
        if not raw.strip():
            continue
        try:
            record = loads(decode_line(raw))
            if not isinstance(record, dict):
                raise ValueError("expected a JSON object")
            if "messages" in record:
                prompt, completion = render_messages(record["messages"])
            else:
                prompt, completion = record.get("prompt"), record.get("completion")
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    raise ValueError("expected string fields 'prompt' and 'completion' (or 'messages')")
            if not completion.strip():
                raise ValueError("empty completion")
        except ValueError as exc:  # JSONDecodeError and invalid UTF-8 included
            if on_bad_line != "skip":
                raise LmforgeError(
                    f'{path}:{line_no}: {exc} (set data.on_bad_line = "skip" to skip such lines)'
                ) from None
            skipped += 1
            continue
        pairs.append((prompt, completion))
    if skipped:
        print(f"warning: {path}: skipped {skipped} bad line(s)", file=sys.stderr)
    if not pairs:
        raise LmforgeError(f"{path}: no examples")
    return pairs


def tokenize_examples(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, max_tokens: int, where: Path
) -> list[Example]:
    """Tokenize prompt and completion separately; cut over-long examples from the prompt's start, counted."""
    eot = eot_id(tokenizer)
    prompts = tokenizer.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    completions = tokenizer.encode_batch([c for _, c in pairs], add_special_tokens=False)
    decoded = tokenizer.decode_batch(
        [p.ids + c.ids for p, c in zip(prompts, completions)], skip_special_tokens=False
    )
    for (prompt, completion), text in zip(pairs, decoded):
        if text != prompt + completion:  # e.g. a character outside a char tokenizer's alphabet
            raise LmforgeError(
                f"{where}: an example has text the tokenizer cannot represent: {prompt[:60]!r}"
            )
    examples, truncated = [], 0
    for p, c in zip(prompts, completions):
        answer = c.ids + ([eot] if eot is not None else [])
        ids = p.ids + answer
        prompt_tokens = len(p.ids)
        if len(ids) > max_tokens:
            truncated += 1
            keep_prompt = max(1, max_tokens - len(answer))
            ids = p.ids[-keep_prompt:] + answer
            ids, prompt_tokens = ids[:max_tokens], keep_prompt
        examples.append(Example(ids, prompt_tokens))
    if truncated:
        print(
            f"warning: {where}: {truncated} of {len(pairs)} examples were longer than block_size + 1 = "
            f"{max_tokens} tokens and were truncated (the prompt's start is cut first)",
            file=sys.stderr,
        )
    return examples


def collate(examples: list[Example], max_length: int | None = None) -> Batch:
    """Right-padded inputs and targets; targets of prompt and padding positions are IGNORE_INDEX.

    The length is rounded up to a multiple of LENGTH_MULTIPLE (at most `max_length`, the block
    size): few distinct shapes keep CPU oneDNN's per-shape kernel caches, and with them the
    process's memory, small.
    """
    longest = max(len(e.ids) for e in examples) - 1
    rounded = longest + -longest % LENGTH_MULTIPLE
    length = rounded if max_length is None else max(longest, min(rounded, max_length))
    x = torch.zeros(len(examples), length, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = ids[1:]
        y[row, : max(0, e.prompt_tokens - 1)] = IGNORE_INDEX  # position t predicts token t + 1
    return x, y


class ExampleBatches:
    """Seeded, resumable batches of examples, reshuffled every epoch.

    Each epoch's random order is cut into pools of BUCKET_BATCHES batches; a pool is sorted by
    length and split into batches, and the batches are shuffled, so a batch holds examples of
    similar length (little padding) while the epoch stays random.
    """

    BUCKET_BATCHES = 50

    def __init__(
        self, examples: list[Example], batch_size: int, seed: int, max_length: int | None = None
    ) -> None:
        self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
        self.lengths = torch.tensor([len(e.ids) for e in examples])
        self.generator = torch.Generator().manual_seed(seed)
        self.order = self._epoch_order()
        self.position, self.epoch = 0, 0

    def _epoch_order(self) -> torch.Tensor:
        order = torch.randperm(len(self.examples), generator=self.generator)
        pool = self.BUCKET_BATCHES * self.batch_size
        pools = [chunk[self.lengths[chunk].argsort(stable=True)] for chunk in order.split(pool)]
        batches = torch.cat(pools).split(self.batch_size)
        shuffled = torch.randperm(len(batches), generator=self.generator)
        return torch.cat([batches[i] for i in shuffled.tolist()])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.position == len(self.order):
                self.order = self._epoch_order()
                self.position, self.epoch = 0, self.epoch + 1
            chosen.append(self.examples[int(self.order[self.position])])
            self.position += 1
        return collate(chosen, self.max_length)

    def state_dict(self) -> dict[str, Any]:
        """The generator, this epoch's order and the position in it: enough to resume exactly."""
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        self.generator.set_state(state["generator"])
        self.order, self.position, self.epoch = state["order"], int(state["position"]), int(state["epoch"])


class SFTData:
    """`train.jsonl` and `val.jsonl` of a folder, tokenized with a given tokenizer.json.

    Satisfies `TrainingData` (lmforge.data.protocol); val.jsonl is its held-out "val" split, on which
    checkpoints are chosen and early stopping decides. The scored split (eval.jsonl) is never read
    here: only `lmforge eval --task` reads it.
    """

    dir: Path
    tokenizer_file: Path
    vocab_size: int
    train: list[Example]  # empty when opened eval_only
    val: list[Example]

    def __init__(
        self,
        directory: Path,
        tokenizer_file: Path,
        block_size: int,
        on_bad_line: str = "error",
        eval_only: bool = False,
    ) -> None:
        self.dir, self.tokenizer_file = directory, tokenizer_file
        tokenizer = load_tokenizer(tokenizer_file)
        self.vocab_size = vocab_size(tokenizer)
        self.train = (
            [] if eval_only else self._read(directory / "train.jsonl", tokenizer, block_size, on_bad_line)
        )
        if not (directory / "val.jsonl").is_file() and (directory / "eval.jsonl").is_file():
            raise LmforgeError(
                f"{directory / 'val.jsonl'}: not found; fine-tuning selects checkpoints on val.jsonl, "
                "never on the scored eval.jsonl (`lmforge tasks prepare` writes both)"
            )
        self.val = self._read(directory / "val.jsonl", tokenizer, block_size, on_bad_line)

    @staticmethod
    def _read(path: Path, tokenizer: Tokenizer, block_size: int, on_bad_line: str) -> list[Example]:
        return tokenize_examples(read_examples(path, on_bad_line), tokenizer, block_size + 1, path)

    def train_batches(self, block_size: int, batch_size: int, seed: int) -> ExampleBatches:
        """The train examples, reshuffled every epoch, padded to at most `block_size`."""
        return ExampleBatches(self.train, batch_size, seed, max_length=block_size)

    def bytes_per_token(self, split: str = "val") -> float | None:
        """Always None: completion bytes are not tracked, so fine-tuning data has no bits-per-byte."""
        return None

    def eval_batches(self, block_size: int, batch_size: int) -> Iterator[Batch]:
        """The val examples in file order, `batch_size` at a time."""
        for start in range(0, len(self.val), batch_size):
            yield collate(self.val[start : start + batch_size], block_size)
