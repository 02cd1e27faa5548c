"""Supervised fine-tuning data: prompt/completion or chat JSONL, trained on the answers only.

Every example is tokenized once at start-up. A `prompt`/`completion` line is the prompt, then the
completion and the tokenizer's end of text (`<|endoftext|>`, or the eos_token of the run's chat
template); a `messages` line (OpenAI style: a list of {role, content}) is rendered with the run's
chat template (`lmforge.data.chat_template`), which decides the format and the end of each turn.
Targets outside the completion or the assistant's replies are IGNORE_INDEX, which
`cross_entropy` ignores. Batches are padded to their longest example; right padding cannot
affect earlier positions under causal attention.

For a span head (model.head = "span") each completion is instead found in its prompt, and the
targets mark where the answer starts and ends there (`collate_spans`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer

from lmforge.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    Segment,
    check_messages,
    encode_segments,
)
from lmforge.data.protocol import Batch
from lmforge.data.tokenizer import load_tokenizer, vocab_size
from lmforge.errors import LmforgeError
from lmforge.jsonl import decode_line, loads, read_lines
from lmforge.targets import IGNORE_INDEX, SPAN_END, SPAN_MATCH, SPAN_OTHER, SPAN_START
from lmforge.words import question_matches, whole_words

logger = logging.getLogger(__name__)
LENGTH_MULTIPLE = 16  # padded batch lengths are multiples of this
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One tokenized example: its ids, and which of them are answer tokens (the loss's targets)."""

    ids: list[int]
    trained: list[bool]  # per id: part of the completion / an assistant reply
    matched: list[bool] | None = None  # span examples, per id: a context word the question holds

    @property
    def length(self) -> int:
        """Tokens in the example: what `ExampleBatches` groups batches by."""
        return len(self.ids)

    @property
    def prompt_tokens(self) -> int:
        """How many leading ids come before the first answer token."""
        return self.trained.index(True) if True in self.trained else len(self.ids)


def prompt_completion(prompt: str, completion: str, eos_token: str = "") -> list[Segment]:
    """A prompt/completion example: the completion and the end of text are trained on."""
    return [Segment(prompt, False), Segment(completion + eos_token, True)]


def render_messages(messages: object, template: ChatTemplate) -> list[Segment]:
    """Chat `messages` rendered with `template`; the last message must be the assistant's."""
    messages = check_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    return template.segments(messages)


def read_examples(path: Path, on_bad_line: str, template: ChatTemplate | None = None) -> list[list[Segment]]:
    """The examples of a JSONL file as segments; bad lines raise or are skipped with a count.

    `template` renders `messages` lines and gives the eos_token that ends a completion
    (default: DEFAULT_CHAT_TEMPLATE without special tokens)."""
    template = template or ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    return read_records(path, on_bad_line, lambda record: _parse_example(record, template))


def read_records(path: Path, on_bad_line: str, parse: Callable[[object], T]) -> list[T]:
    """`parse` applied to each JSON line of a file; a line it refuses (ValueError) raises or is
    skipped with a count."""
    if not path.is_file():
        raise LmforgeError(f"{path}: not found")
    examples, skipped = [], 0
    for line_no, raw in read_lines(path):
        if not raw.strip():
            continue
        try:
            examples.append(parse(loads(decode_line(raw))))
        except ValueError as exc:  # JSONDecodeError and invalid UTF-8 included
            if on_bad_line != "skip":
                raise LmforgeError(
                    f'{path}:{line_no}: {exc} (set data.on_bad_line = "skip" to skip such lines)'
                ) from None
            skipped += 1
    if skipped:
        logger.warning(f"{path}: skipped {skipped} bad line(s)")
    if not examples:
        raise LmforgeError(f"{path}: no examples")
    return examples


def _parse_example(record: object, template: ChatTemplate) -> list[Segment]:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        segments = render_messages(record["messages"], template)
    else:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("expected string fields 'prompt' and 'completion' (or 'messages')")
        segments = prompt_completion(prompt, completion, template.special_tokens.get("eos_token", ""))
    if not "".join(s.text for s in segments if s.assistant).strip():
        raise ValueError("empty completion")
    return segments


@dataclass(frozen=True)
class AnswerSpan:
    """An extractive example: the prompt, and where in it (characters start:end) the answer lies."""

    prompt: str
    start: int
    end: int


def parse_answer_span(record: object) -> AnswerSpan:
    """A prompt/completion record whose completion is a span of its prompt: at the record's
    `answer_start` (a character offset into the prompt) if given, else its first occurrence as
    whole words (else as any text)."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("expected string fields 'prompt' and 'completion' (a span head reads no 'messages')")
    answer = completion.strip()
    if not answer:
        raise ValueError("empty completion")
    start = record.get("answer_start")
    if start is None:
        found = whole_words(answer).search(prompt)
        start = found.start() if found else prompt.find(answer)
    if not isinstance(start, int) or isinstance(start, bool):
        raise ValueError(f"'answer_start' must be an integer, got {start!r}")
    if start < 0 or prompt[start : start + len(answer)] != answer:
        where = f"at answer_start {start}" if record.get("answer_start") is not None else "anywhere"
        raise ValueError(f"the completion {answer[:40]!r} is not in the prompt {where}")
    return AnswerSpan(prompt, start, start + len(answer))


def tokenize_spans(
    spans: list[AnswerSpan], tokenizer: Tokenizer, max_tokens: int, *, where: Path
) -> list[Example]:
    """The prompts' tokens, the answer's marked as trained; a prompt over `max_tokens` loses its start,
    and an example whose answer was in the part cut off is dropped (both counted)."""
    out, truncated, dropped = [], 0, 0
    for span, encoded in zip(
        spans, tokenizer.encode_batch([s.prompt for s in spans], add_special_tokens=False)
    ):
        ids = encoded.ids
        if tokenizer.decode(ids, skip_special_tokens=False) != span.prompt:  # as tokenize_examples refuses
            raise LmforgeError(
                f"{where}: an example has text the tokenizer cannot represent: {span.prompt[:60]!r}"
            )
        trained = [start < span.end and end > span.start for start, end in encoded.offsets]
        matched = question_matches(span.prompt, encoded.offsets)
        if len(ids) > max_tokens:
            truncated += 1
            ids, trained, matched = ids[-max_tokens:], trained[-max_tokens:], matched[-max_tokens:]
        if any(trained):
            out.append(Example(ids, trained, matched))
        else:
            dropped += 1
    if truncated:
        logger.warning(
            f"{where}: {truncated} of {len(spans)} prompts were longer than block_size = "
            f"{max_tokens} tokens and lost their start; {dropped} of them lost the answer and were dropped"
        )
    if not out:
        raise LmforgeError(f"{where}: no example keeps its answer within block_size = {max_tokens} tokens")
    return out


def tokenize_examples(
    examples: list[list[Segment]], tokenizer: Tokenizer, max_tokens: int, *, where: Path
) -> list[Example]:
    """Tokenize each segment apart (as `lmforge chat` does); over-long examples lose their start, counted."""
    out, truncated = [], 0
    for segments, encoded in zip(examples, encode_segments(tokenizer, examples)):
        if not encoded.exact:  # e.g. a character outside a char tokenizer's alphabet
            raise LmforgeError(
                f"{where}: an example has text the tokenizer cannot represent: {segments[0].text[:60]!r}"
            )
        ids, trained = encoded.ids, encoded.assistant
        if len(ids) > max_tokens:
            truncated += 1
            ids, trained = ids[-max_tokens:], trained[-max_tokens:]
        out.append(Example(ids, trained))
    if truncated:
        logger.warning(
            f"{where}: {truncated} of {len(examples)} examples were longer than block_size + 1 = "
            f"{max_tokens} tokens and were truncated (the prompt's start is cut first)"
        )
    return out


def collate(examples: list[Example], max_length: int | None = None) -> Batch:
    """Right-padded inputs and targets; targets of prompt and padding positions are IGNORE_INDEX.

    The length is rounded up to a multiple of LENGTH_MULTIPLE (at most `max_length`, the block
    size): few distinct shapes keep CPU oneDNN's per-shape kernel caches, and with them the
    process's memory, small.
    """
    length = padded_length(max(len(e.ids) for e in examples) - 1, max_length)
    x = torch.zeros(len(examples), length, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = ids[1:]
        ignored = ~torch.tensor(e.trained[1:], dtype=torch.bool)  # position t predicts token t + 1
        y[row, :n][ignored] = IGNORE_INDEX
    return x, y


def collate_spans(examples: list[Example], max_length: int | None = None) -> Batch:
    """Right-padded prompts and their span targets (model.head = "span"): SPAN_START on the answer's
    first token, SPAN_END on its last, SPAN_OTHER on the rest of the prompt, IGNORE_INDEX on padding;
    SPAN_MATCH added on the words of the context that the question holds (the model's input)."""
    length = padded_length(max(len(e.ids) for e in examples), max_length)
    x = torch.zeros(len(examples), length, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        x[row, :n] = torch.tensor(e.ids, dtype=torch.long)
        y[row, :n] = SPAN_OTHER
        first, last = e.trained.index(True), n - 1 - e.trained[::-1].index(True)
        y[row, first] |= SPAN_START
        y[row, last] |= SPAN_END
        if e.matched is not None:
            y[row, :n] |= SPAN_MATCH * torch.tensor(e.matched, dtype=torch.long)
    return x, y


def padded_length(longest: int, max_length: int | None) -> int:
    """`longest` rounded up to a multiple of LENGTH_MULTIPLE, but not past `max_length` (see `collate`)."""
    rounded = longest + -longest % LENGTH_MULTIPLE
    return rounded if max_length is None else max(longest, min(rounded, max_length))


class ExampleBatches:
    """Seeded, resumable batches of examples, reshuffled every epoch.

    Each epoch's random order is cut into pools of BUCKET_BATCHES batches; a pool is sorted by
    length and split into batches, and the batches are shuffled, so a batch holds examples of
    similar length (little padding) while the epoch stays random.
    """

    BUCKET_BATCHES = 50

    def __init__(
        self,
        examples: list[Example],  # or anything with a `length` that `collate` takes (preference pairs)
        batch_size: int,
        seed: int,
        *,
        max_length: int | None = None,
        collate: Callable[[list[Example], int | None], Batch] = collate,
    ) -> None:
        self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
        self.collate = collate
        self.lengths = torch.tensor([e.length for e in examples])
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
        return self.collate(chosen, self.max_length)

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
    chat_template: ChatTemplate  # renders `messages` lines; saved with the run's checkpoints
    vocab_size: int
    train: list[Example]  # empty when opened eval_only
    val: list[Example]

    def __init__(
        self,
        directory: Path,
        tokenizer_file: Path,
        block_size: int,
        *,
        on_bad_line: str = "error",
        eval_only: bool = False,
        chat_template: ChatTemplate | None = None,
        head: str = "lm",
    ) -> None:
        self.dir, self.tokenizer_file = directory, tokenizer_file
        # the batch rule of the model's head (model.head): a span head's locates each completion in its
        # prompt (`tokenize_spans`, `collate_spans`)
        self.spans = head == "span"
        self.collate = collate_spans if self.spans else collate
        tokenizer = load_tokenizer(tokenizer_file)
        self.chat_template = chat_template or ChatTemplate.default(tokenizer)
        self.vocab_size = vocab_size(tokenizer)
        self.train = (
            []
            if eval_only
            else self._read(directory / "train.jsonl", tokenizer, block_size, on_bad_line=on_bad_line)
        )
        if not (directory / "val.jsonl").is_file() and (directory / "eval.jsonl").is_file():
            raise LmforgeError(
                f"{directory / 'val.jsonl'}: not found; fine-tuning selects checkpoints on val.jsonl, "
                "never on the scored eval.jsonl (`lmforge tasks prepare` writes both)"
            )
        self.val = self._read(directory / "val.jsonl", tokenizer, block_size, on_bad_line=on_bad_line)

    def _read(self, path: Path, tokenizer: Tokenizer, block_size: int, *, on_bad_line: str) -> list[Example]:
        if self.spans:
            return tokenize_spans(
                read_records(path, on_bad_line, parse_answer_span), tokenizer, block_size, where=path
            )
        examples = read_examples(path, on_bad_line, self.chat_template)
        return tokenize_examples(examples, tokenizer, block_size + 1, where=path)

    def train_batches(self, block_size: int, batch_size: int, seed: int) -> ExampleBatches:
        """The train examples, reshuffled every epoch, padded to at most `block_size`."""
        return ExampleBatches(self.train, batch_size, seed, max_length=block_size, collate=self.collate)

    def bytes_per_token(self, split: str = "val") -> float | None:
        """Always None: completion bytes are not tracked, so fine-tuning data has no bits-per-byte."""
        return None

    def eval_batches(self, block_size: int, batch_size: int) -> Iterator[Batch]:
        """The val examples in file order, `batch_size` at a time."""
        for start in range(0, len(self.val), batch_size):
            yield self.collate(self.val[start : start + batch_size], block_size)
