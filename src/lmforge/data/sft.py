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

import bisect
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer

from lmforge.config import ColumnsConfig, DataConfig
from lmforge.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    Segment,
    check_messages,
    encode_segments,
)
from lmforge.data.protocol import Batch, PackedBatch
from lmforge.data.records import FILE_TYPES, Row, file_type, hf_rows, read_rows
from lmforge.data.tokenizer import load_tokenizer, vocab_size
from lmforge.errors import LmforgeError
from lmforge.files import file_suffix
from lmforge.jsonl import loads
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


def answer_ends(template: ChatTemplate) -> tuple[str, ...]:
    """What `template` closes an answer with (its end of turn, its eos_token): no answer by itself."""
    try:
        end_of_turn = template.end_of_turn()
    except LmforgeError:  # a template that refuses the probe conversation (say, without a system turn)
        end_of_turn = ""
    return tuple(t for t in (end_of_turn, template.special_tokens.get("eos_token", "")) if t)


def empty_answer(segments: list[Segment], ends: tuple[str, ...]) -> bool:
    """Whether the trained segments hold nothing but whitespace and the `answer_ends` that close them."""
    text = "".join(s.text for s in segments if s.assistant)
    for end in ends:
        text = text.replace(end, "")
    return not text.strip()


def render_messages(messages: object, template: ChatTemplate) -> list[Segment]:
    """Chat `messages` rendered with `template`; the last message must be the assistant's."""
    messages = check_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    return template.segments(messages)


# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py), the completion the `output` that
# follows "### Response:" directly, as there: a model tuned on them is prompted with the same text.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# ShareGPT's speakers (`from`) as chat roles; "gpt" and "human" are ShareGPT's own, the rest aliases.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class RecordShape:
    """How records are read: their format (data.format; "auto": each record's from its keys) and the
    columns that hold the prompt, the completion or the messages (data.columns)."""

    format: str = "auto"
    columns: ColumnsConfig = ColumnsConfig()

    def format_of(self, record: dict) -> str:
        """The format of `record`: the one named, else a mapped column's, else found by its keys."""
        if self.format != "auto":
            return self.format
        if self.columns.messages:
            return "messages"
        if self.columns.prompt or self.columns.completion:
            return "prompt_completion"
        for fmt, keys in (
            ("messages", {"messages"}),
            ("sharegpt", {"conversations"}),
            ("alpaca", {"instruction", "output"}),
            ("prompt_completion", {"prompt"}),
            ("prompt_completion", {"completion"}),
        ):
            if keys <= record.keys():
                return fmt
        found = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise ValueError(
            "no known format: expected 'prompt'/'completion', 'messages', 'conversations' (ShareGPT) or "
            f"'instruction'/'output' (Alpaca); found {found} (map columns with data.columns.*)"
        )


class RecordParser:
    """Records to segments, by their format (`RecordShape`); counts the formats it has read."""

    def __init__(self, template: ChatTemplate, shape: RecordShape | None = None) -> None:
        self.template, self.shape = template, shape or RecordShape()
        self.ends = answer_ends(template)
        self.formats: Counter[str] = Counter()

    def __call__(self, record: object) -> list[Segment]:
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        fmt = self.shape.format_of(record)
        segments = getattr(self, f"_{fmt}")(record)
        if empty_answer(segments, self.ends):  # an end of text alone would teach it to answer nothing
            raise ValueError("empty completion")
        self.formats[fmt] += 1
        return segments

    def describe(self) -> str:
        """The formats read, e.g. "alpaca" or "messages 3, prompt_completion 5"."""
        if len(self.formats) == 1:
            return next(iter(self.formats))
        return ", ".join(f"{fmt} {n:,}" for fmt, n in sorted(self.formats.items()))

    def _prompt_completion(self, record: dict) -> list[Segment]:
        names = self.shape.columns.prompt or "prompt", self.shape.columns.completion or "completion"
        prompt, completion = (record.get(name) for name in names)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            extra = "" if self.shape.columns.prompt or self.shape.columns.completion else " (or 'messages')"
            raise ValueError(f"expected string fields {names[0]!r} and {names[1]!r}{extra}")
        return prompt_completion(prompt, completion, self.template.special_tokens.get("eos_token", ""))

    def _messages(self, record: dict) -> list[Segment]:
        name = self.shape.columns.messages or "messages"
        if name not in record:
            raise ValueError(f"expected a field {name!r} of chat messages")
        return render_messages(chat_messages(record[name], name), self.template)

    def _sharegpt(self, record: dict) -> list[Segment]:
        name = self.shape.columns.messages or "conversations"
        if name not in record:
            raise ValueError(f"expected a field {name!r} of ShareGPT turns (from, value)")
        return render_messages(chat_messages(record[name], name), self.template)

    def _alpaca(self, record: dict) -> list[Segment]:
        # a table (CSV, Parquet, a Hugging Face dataset) holds None where a record has no input
        instruction, output = record.get("instruction"), record.get("output")
        given = record.get("input") or ""
        if not all(isinstance(v, str) for v in (instruction, given, output)):
            raise ValueError("expected string fields 'instruction' and 'output' (and 'input', if any)")
        template = ALPACA_PROMPT if given.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=instruction, input=given)
        return prompt_completion(prompt, output, self.template.special_tokens.get("eos_token", ""))


def chat_messages(value: object, name: str) -> object:
    """A column of chat messages as {role, content} dicts: JSON text (a CSV cell) is decoded, and
    ShareGPT turns ({from, value}) are renamed; anything else is left for `check_messages` to judge."""
    if isinstance(value, str):
        try:
            value = loads(value)
        except ValueError:
            raise ValueError(f"{name!r} holds text that is not a JSON list of messages") from None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "from" in m for m in value):
        turns = []
        for m in value:
            role = SHAREGPT_ROLES.get(m.get("from"))
            if role is None:
                known = ", ".join(SHAREGPT_ROLES)
                raise ValueError(f"{name!r}: unknown speaker {m.get('from')!r} (known: {known})")
            turns.append({"role": role, "content": m.get("value")})
        return turns
    return value


def read_examples(
    path: Path, on_bad_line: str, template: ChatTemplate | None = None, *, shape: RecordShape | None = None
) -> list[list[Segment]]:
    """The examples of a record file (.jsonl, .json, .csv, .tsv, .parquet) as segments; bad records
    raise or are skipped with a count.

    `template` renders `messages` lines and gives the eos_token that ends a completion
    (default: DEFAULT_CHAT_TEMPLATE without special tokens)."""
    parser = RecordParser(template or ChatTemplate(DEFAULT_CHAT_TEMPLATE), shape)
    return read_records(path, on_bad_line, parser)


def read_records(path: Path, on_bad_line: str, parse: Callable[[object], T]) -> list[T]:
    """`parse` applied to each record of a file; a record it refuses (ValueError) raises or is
    skipped with a count."""
    return parse_rows(read_rows(path), on_bad_line, parse, where=path)


def parse_rows(
    rows: Iterable[Row], on_bad_line: str, parse: Callable[[object], T], *, where: object
) -> list[T]:
    """`parse` applied to each row's record; a bad one raises naming its place, or is skipped with a count."""
    examples, skipped = [], 0
    for row in rows:
        try:
            examples.append(parse(row.load()))
        except ValueError as exc:  # JSONDecodeError and invalid UTF-8 included
            if on_bad_line != "skip":
                raise LmforgeError(
                    f'{row.where}: {exc} (set data.on_bad_line = "skip" to skip such records)'
                ) from None
            skipped += 1
    if skipped:
        logger.warning(f"{where}: skipped {skipped} bad line(s)")
    if not examples:
        raise LmforgeError(f"{where}: no examples")
    return examples


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
        _place(e, x[row], y[row], start=0)
    return x, y


def _place(e: Example, x: torch.Tensor, y: torch.Tensor, *, start: int) -> int:
    """Write example `e`'s inputs and targets into rows x, y from position `start`; returns its length."""
    ids = torch.tensor(e.ids, dtype=torch.long)
    n = len(e.ids) - 1
    x[start : start + n] = ids[:-1]
    target = ids[1:].clone()
    target[~torch.tensor(e.trained[1:], dtype=torch.bool)] = IGNORE_INDEX  # position t predicts token t + 1
    y[start : start + n] = target
    return n


def collate_packed(rows: list[list[Example]], max_length: int | None = None) -> PackedBatch:
    """Rows of several examples each, end to end: the inputs and targets of `collate`, example by
    example, and `documents`, the index in its row of the example each position belongs to (-1 on
    padding); the model keeps attention within an example and restarts its positions (`GPT.forward`)."""
    length = padded_length(max(sum(len(e.ids) - 1 for e in row) for row in rows), max_length)
    x = torch.zeros(len(rows), length, dtype=torch.long)
    y = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    documents = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, e in enumerate(row):
            n = _place(e, x[r], y[r], start=start)
            documents[r, start : start + n] = k
            start += n
    return x, y, documents


def pack_rows(indices: list[int], sizes: list[int], capacity: int) -> list[list[int]]:
    """Examples `indices` (of `sizes` positions each) packed into rows of `capacity` positions, best fit
    decreasing: longest first, each into the fullest row that still has room for it."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the tightest fit
    for i in sorted(indices, key=lambda i: -sizes[i]):
        k = bisect.bisect_left(free, (sizes[i], -1))
        if k == len(free):
            rows.append([i])
            room, row = capacity - sizes[i], len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= sizes[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


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
    similar length (little padding) while the epoch stays random. With `pack`, a pool's examples are
    instead packed into rows of `max_length` positions (`pack_rows`), the rows shuffled, and a batch
    is `batch_size` rows (`collate_packed`).
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
        pack: bool = False,
    ) -> None:
        if pack and max_length is None:
            raise ValueError("packing needs max_length, the positions of a row")
        self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
        self.collate, self.pack = collate, pack
        self.lengths = torch.tensor([e.length for e in examples])
        self.generator = torch.Generator().manual_seed(seed)
        # packed: row r is examples order[bounds[r]:bounds[r + 1]]; else row r is example order[r]
        self.bounds: torch.Tensor | None = None
        self.order = self._epoch_order()
        self.position, self.epoch = 0, 0

    def _epoch_order(self) -> torch.Tensor:
        order = torch.randperm(len(self.examples), generator=self.generator)
        pool = self.BUCKET_BATCHES * self.batch_size
        if self.pack:
            return self._packed_order(order.split(pool))
        pools = [chunk[self.lengths[chunk].argsort(stable=True)] for chunk in order.split(pool)]
        batches = torch.cat(pools).split(self.batch_size)
        shuffled = torch.randperm(len(batches), generator=self.generator)
        return torch.cat([batches[i] for i in shuffled.tolist()])

    def _packed_order(self, pools: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The epoch's rows, packed pool by pool and shuffled; sets `bounds`."""
        sizes = (self.lengths - 1).tolist()  # positions: an example of n ids has n - 1 targets
        rows = [row for chunk in pools for row in pack_rows(chunk.tolist(), sizes, self.max_length)]
        rows = [rows[i] for i in torch.randperm(len(rows), generator=self.generator).tolist()]
        self.bounds = torch.tensor([0, *itertools.accumulate(len(row) for row in rows)])
        return torch.tensor([i for row in rows for i in row], dtype=torch.long)

    @property
    def rows(self) -> int:
        """Rows in this epoch: examples, or packed rows."""
        return len(self.order) if self.bounds is None else len(self.bounds) - 1

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch | PackedBatch:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.position == self.rows:
                self.order = self._epoch_order()
                self.position, self.epoch = 0, self.epoch + 1
            if self.bounds is None:
                chosen.append(self.examples[int(self.order[self.position])])
            else:
                members = self.order[self.bounds[self.position] : self.bounds[self.position + 1]]
                chosen.append([self.examples[i] for i in members.tolist()])
            self.position += 1
        if self.pack:
            return collate_packed(chosen, self.max_length)
        return self.collate(chosen, self.max_length)

    def state_dict(self) -> dict[str, Any]:
        """The generator, this epoch's order and the position in it: enough to resume exactly."""
        state = {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
        }
        if self.bounds is not None:
            state["bounds"] = self.bounds
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        if ("bounds" in state) != self.pack:
            raise LmforgeError("the checkpoint's batches were drawn with another data.pack; resume with it")
        drawn_from = len(state["order"])  # an epoch's order holds each example once, packed or not
        if drawn_from != len(self.examples):  # its indices would name other examples, or none
            raise LmforgeError(
                f"the checkpoint's batches were drawn from {drawn_from} train examples, the data has "
                f"{len(self.examples)}: resume with the data (data.dir, data.val_fraction) the run trained on"
            )
        self.generator.set_state(state["generator"])
        self.order, self.position, self.epoch = state["order"], int(state["position"]), int(state["epoch"])
        self.bounds = state.get("bounds")


@dataclass(frozen=True)
class RecordSource:
    """Where one split's records come from: a name for messages, and the rows."""

    name: str
    rows: Callable[[], Iterable[Row]]


def record_sources(directory: Path, data: DataConfig) -> tuple[RecordSource, RecordSource | None]:
    """The train records and the val records (None: carve them from train) of data.hf, of a single
    file, or of a folder's train.* and val.* files."""
    if data.hf:
        train = RecordSource(
            f"{data.hf}[{data.hf_split}]",
            lambda: hf_rows(data.hf, split=data.hf_split, config=data.hf_config),
        )
        if not data.hf_val_split:
            return train, None
        return train, RecordSource(
            f"{data.hf}[{data.hf_val_split}]",
            lambda: hf_rows(data.hf, split=data.hf_val_split, config=data.hf_config),
        )
    if directory.is_file():
        if file_type(directory) is None:
            raise LmforgeError(
                f"{directory}: unknown file type {directory.suffix!r} for fine-tuning data "
                f"(expected {', '.join(FILE_TYPES)})"
            )
        return RecordSource(str(directory), lambda: read_rows(directory)), None
    if not directory.is_dir():
        raise LmforgeError(f"{directory}: not found (data.dir: a folder with train.* files, or one file)")
    train, val = _split_file(directory, "train"), _split_file(directory, "val")
    if train is None:
        raise LmforgeError(f"{directory}: no train file ({', '.join('train' + ext for ext in FILE_TYPES)})")
    scored = _split_file(directory, "eval")
    if val is None and scored is not None:
        raise LmforgeError(
            f"{directory}: no val file; fine-tuning selects checkpoints on val.*, never on the scored "
            f"{scored.name} (`lmforge tasks prepare` writes both)"
        )
    return RecordSource(str(train), lambda: read_rows(train)), (
        None if val is None else RecordSource(str(val), lambda: read_rows(val))
    )


def is_fine_tuning_data(path: Path) -> bool:
    """Whether `path` holds fine-tuning records (a record file, or a folder with train.* or val.* ones)
    rather than the token shards of `lmforge prepare`."""
    if path.is_file():
        return file_type(path) is not None
    return not (path / "meta.json").is_file() and any(_split_files(path, split) for split in ("train", "val"))


def _split_files(directory: Path, split: str) -> list[Path]:
    """The `split`.EXT record files of a folder (EXT in any case: `train.JSONL` too), in FILE_TYPES' order."""
    if not directory.is_dir():
        return []
    named = [p for p in directory.iterdir() if p.stem == split and file_type(p) is not None and p.is_file()]
    order = list(FILE_TYPES)
    return sorted(named, key=lambda p: (order.index(file_suffix(p)), p.name))


def _split_file(directory: Path, split: str) -> Path | None:
    """The one `split`.EXT record file of a folder, if any."""
    found = _split_files(directory, split)
    if len(found) > 1:
        raise LmforgeError(f"{directory}: both {found[0].name} and {found[1].name}; keep one {split} file")
    return found[0] if found else None


def carve_val(examples: list[T], fraction: float, seed: int, *, where: str) -> tuple[list[T], list[T]]:
    """A seeded choice of round(fraction x n) examples (at least one) as val, the rest train, both in
    their original order."""
    if len(examples) < 2:
        raise LmforgeError(f"{where}: one example is too few to hold out a validation split (add a val file)")
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    chosen = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n_val]
    is_val = set(chosen.tolist())
    train = [e for i, e in enumerate(examples) if i not in is_val]
    return train, [e for i, e in enumerate(examples) if i in is_val]


class SFTData:
    """Fine-tuning examples, tokenized with a given tokenizer.json: a folder's train.* and val.* files
    (JSONL, JSON, CSV, TSV or Parquet), a single file, or a Hugging Face dataset (data.hf).

    Satisfies `TrainingData` (lmforge.data.protocol); the val examples (val.*, data.hf_val_split, else
    carved from train by data.val_fraction and data.val_seed) are its held-out "val" split, on which
    checkpoints are chosen and early stopping decides. The scored split (eval.*) is never read here:
    only `lmforge eval --task` reads it. `summary` says what was read, in which format.
    """

    dir: Path
    tokenizer_file: Path
    chat_template: ChatTemplate  # renders `messages` lines; saved with the run's checkpoints
    vocab_size: int
    train: list[Example]  # empty when opened eval_only (unless val is carved from train)
    val: list[Example]
    summary: str  # one line: the sources, the examples of each split and their format

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
        data: DataConfig | None = None,
    ) -> None:
        data = data or DataConfig()
        self.dir, self.tokenizer_file = Path(data.hf) if data.hf else directory, tokenizer_file
        # the batch rule of the model's head (model.head): a span head's locates each completion in its
        # prompt (`tokenize_spans`, `collate_spans`)
        self.spans, self.pack = head == "span", data.pack
        self.collate = collate_spans if self.spans else collate
        tokenizer = load_tokenizer(tokenizer_file)
        self.chat_template = chat_template or ChatTemplate.default(tokenizer)
        self.vocab_size = vocab_size(tokenizer)
        parser = RecordParser(self.chat_template, RecordShape(data.format, data.columns))
        parse = parse_answer_span if self.spans else parser
        train_source, val_source = record_sources(directory, data)
        train = [] if eval_only and val_source else self._records(train_source, parse, on_bad_line)
        train_formats = parser.describe()  # before val's records are counted too
        if val_source is None:
            train, val = carve_val(train, data.val_fraction, data.val_seed, where=train_source.name)
            held_out = (
                f"carved from train (data.val_fraction {data.val_fraction:g}, data.val_seed {data.val_seed})"
            )
        else:
            val, held_out = self._records(val_source, parse, on_bad_line), f"from {val_source.name}"
        self.train = (
            [] if eval_only else self._tokenize(train, tokenizer, block_size, where=train_source.name)
        )
        self.val = self._tokenize(val, tokenizer, block_size, where=(val_source or train_source).name)
        formats = "prompt_completion spans" if self.spans else train_formats or parser.describe()
        self.summary = (
            f"fine-tuning data: {len(self.train):,} train examples from {train_source.name} ({formats}), "
            f"{len(self.val):,} val {held_out}{'; packed (data.pack)' if self.pack else ''}"
        )

    @staticmethod
    def _records(source: RecordSource, parse: Callable[[object], T], on_bad_line: str) -> list[T]:
        return parse_rows(source.rows(), on_bad_line, parse, where=source.name)

    def _tokenize(self, records: list, tokenizer: Tokenizer, block_size: int, *, where: str) -> list[Example]:
        if self.spans:
            return tokenize_spans(records, tokenizer, block_size, where=where)
        return tokenize_examples(records, tokenizer, block_size + 1, where=where)

    def train_batches(self, block_size: int, batch_size: int, seed: int) -> ExampleBatches:
        """The train examples, reshuffled every epoch, padded to at most `block_size`, or packed into
        rows of `block_size` positions (data.pack)."""
        return ExampleBatches(
            self.train, batch_size, seed, max_length=block_size, collate=self.collate, pack=self.pack
        )

    def bytes_per_token(self, split: str = "val") -> float | None:
        """Always None: completion bytes are not tracked, so fine-tuning data has no bits-per-byte."""
        return None

    def eval_batches(self, block_size: int, batch_size: int) -> Iterator[Batch]:
        """The val examples in file order, `batch_size` at a time (never packed: one example per row)."""
        for start in range(0, len(self.val), batch_size):
            yield self.collate(self.val[start : start + batch_size], block_size)
