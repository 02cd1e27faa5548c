"""What every task is made of, and the helpers tasks share: reading eval.jsonl, scoring
choices, decoding answers.

The CLI imports the task registry to build its parser, so nothing here imports torch (or
anything that does) at module level: those imports wait inside the functions that use them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from lmforge.errors import LmforgeError
from lmforge.jsonl import decode_line, loads, read_lines
from lmforge.words import question_matches

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer


def read_eval(path: Path, limit: int | None) -> list[dict]:
    """The JSON records of a JSONL file (the first `limit` of them), refusing a missing or empty file."""
    if not path.is_file():
        raise LmforgeError(f"{path}: not found (write it with `lmforge tasks prepare`)")
    records = []
    for line_no, raw in read_lines(path):
        if raw.strip():
            try:
                record = loads(decode_line(raw))
            except json.JSONDecodeError as exc:
                raise LmforgeError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            except ValueError as exc:  # invalid UTF-8
                raise LmforgeError(f"{path}:{line_no}: {exc}") from None
            if not isinstance(record, dict):
                raise LmforgeError(f"{path}:{line_no}: expected a JSON object")
            records.append(record)
        if limit and len(records) == limit:
            break
    if not records:
        raise LmforgeError(f"{path}: no examples")
    return records


def require_fields(records: list[dict], fields: tuple[str, ...], path: Path) -> None:
    """Refuse records that lack one of `fields`, naming the first such example."""
    for i, record in enumerate(records, start=1):
        missing = [f for f in fields if f not in record]
        if missing:
            raise LmforgeError(f"{path}: example {i} lacks {', '.join(missing)}")


def encode_prompt(tokenizer: Tokenizer, prompt: str, room: int) -> list[int]:
    """The prompt's last `room` tokens: a long prompt loses its start, never the end the answer follows."""
    return tokenizer.encode(prompt, add_special_tokens=False).ids[-room:]


def choice_log_probs(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, *, choices: list[str], device: torch.device
) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the prompt."""
    import torch

    with torch.inference_mode():
        block = model.config.block_size
        options = [tokenizer.encode(c, add_special_tokens=False).ids for c in choices]
        room = block + 1 - max(len(o) for o in options)
        context = encode_prompt(tokenizer, prompt, room)
        rows = [context + o for o in options]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r) - 1] = torch.tensor(r[:-1])
        log_probs = torch.log_softmax(model(x.to(device))[0].float(), dim=-1)
        scores = []
        for i, option in enumerate(options):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(option))
            scores.append(log_probs[i, positions, torch.tensor(option)].sum().item())
    return scores


def sentence_log_likelihood(
    model: torch.nn.Module, tokenizer: Tokenizer, text: str, *, device: torch.device
) -> float:
    """Sum of log p(token | <|endoftext|>, earlier tokens) over the sentence's tokens; a sentence longer
    than the block is scored in consecutive windows, each conditioned on the token before it, as the
    harness's rolling windows do. Without <|endoftext|> the first token has no context: not scored."""
    import torch

    from lmforge.data.tokenizer import eot_id

    start = eot_id(tokenizer)
    ids = ([start] if start is not None else []) + tokenizer.encode(text, add_special_tokens=False).ids
    block, total, first = model.config.block_size, 0.0, 1  # ids[first:] are the tokens still to score
    with torch.inference_mode():
        while first < len(ids):
            end = min(len(ids), first + block)  # score ids[first:end] from ids[end-1-block : end-1]
            window = torch.tensor([ids[max(0, end - 1 - block) : end - 1]], device=device)
            log_probs = torch.log_softmax(model(window)[0][0].float(), dim=-1)  # (T, vocab)
            targets = torch.tensor(ids[first:end], device=device)
            total += log_probs[-len(targets) :].gather(1, targets[:, None]).sum().item()
            first = end
    return total


def decode(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    beam_size: int,
    device: torch.device,
    end_ids: Sequence[int] = (),
) -> str:
    """A completion that ends at a newline or the model's end of text: one of `end_ids` (an imported
    model's own), else <|endoftext|> (either ends a completion in the task files)."""
    import torch

    from lmforge.data.tokenizer import end_ids as model_end_ids
    from lmforge.inference.generate import beam_search

    stops = {*model_end_ids(tokenizer, end_ids), *tokenizer.encode("\n", add_special_tokens=False).ids}
    context = encode_prompt(tokenizer, prompt, model.config.block_size - max_new_tokens)
    tokens = beam_search(
        model,
        torch.tensor([context], device=device),
        beam_size,
        max_new_tokens=max_new_tokens,
        stop_tokens=stops,
    )
    return tokenizer.decode(tokens).strip()


def extract_span(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, *, max_tokens: int, device: torch.device
) -> str:
    """The span of the prompt that a span head scores highest (start score + end score), at most
    `max_tokens` tokens long, as the prompt's own text; a long prompt loses its start first."""
    import torch

    encoded = tokenizer.encode(prompt, add_special_tokens=False)
    keep = slice(-model.config.block_size, None)
    ids, offsets = encoded.ids[keep], encoded.offsets[keep]
    if not ids:  # an empty prompt has no span
        return ""
    matched = (  # model.word_match's input
        torch.tensor([question_matches(prompt, offsets)], device=device) if model.config.word_match else None
    )
    with torch.inference_mode():
        scores = model(torch.tensor([ids], device=device), matched=matched)[0][0].float()  # (T, 2)
    pairs = scores[:, 0, None] + scores[None, :, 1]  # [start, end]
    # start <= end < start + max_tokens
    allowed = torch.ones_like(pairs, dtype=torch.bool).triu().tril(max_tokens - 1)
    start, end = divmod(int(pairs.masked_fill(~allowed, float("-inf")).argmax()), len(ids))
    return prompt[offsets[start][0] : offsets[end][1]].strip()


def prediction_line(number: int, record: dict, references: dict, *, prediction: object, score: dict) -> dict:
    """One line of `lmforge eval --predictions`: the example's id (its own, else its line number in the
    scored file, from 1), prompt, reference(s), the model's prediction and the example's scores."""
    return {
        "id": record.get("id", number),
        "prompt": record["prompt"],
        **references,
        "prediction": prediction,
        "score": score,
    }


@dataclass(frozen=True)
class EvalRun:
    """The model being evaluated, with what a task needs to query it."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    device: torch.device
    data_dir: Path  # the task folder: eval.jsonl, and train.jsonl where a baseline learns from it
    beam_size: int = 1
    max_new_tokens: int = 64
    calibrate: bool = False  # tasks that score choices: against a content-free input (`Task.calibrates`)
    end_ids: tuple[int, ...] = ()  # the tokens that end a decoded answer (the session's), else <|endoftext|>

    @property
    def eval_file(self) -> Path:
        return self.data_dir / "eval.jsonl"

    def choice_log_probs(self, prompt: str, choices: list[str]) -> list[float]:
        return choice_log_probs(self.model, self.tokenizer, prompt, choices=choices, device=self.device)

    def sentence_log_likelihood(self, text: str) -> float:
        """The log-likelihood of a whole text after `<|endoftext|>` (see `sentence_log_likelihood`)."""
        return sentence_log_likelihood(self.model, self.tokenizer, text, device=self.device)

    @property
    def extractive(self) -> bool:
        """Whether the model has a span head: it answers with a span of the prompt, not by decoding."""
        return self.model.config.head == "span"

    @property
    def decoding(self) -> str:
        if self.extractive:
            return f"extractive (the best span of the prompt, at most {self.max_new_tokens} tokens)"
        return f"beam {self.beam_size}" if self.beam_size > 1 else "greedy"

    def decode(self, prompt: str) -> str:
        if self.extractive:
            return extract_span(
                self.model, self.tokenizer, prompt, max_tokens=self.max_new_tokens, device=self.device
            )
        return decode(
            self.model,
            self.tokenizer,
            prompt,
            max_new_tokens=self.max_new_tokens,
            beam_size=self.beam_size,
            device=self.device,
            end_ids=self.end_ids,
        )


class Task(ABC):
    """One task: its dataset conversion, prompt format, scoring and trivial baseline.

    Each module of `lmforge.tasks` defines one and exposes an instance as `TASK`; that is all
    it takes to register a task.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # every eval.jsonl record must have these
    # Place in help texts and messages (ties go by name): the built-in tasks keep the order
    # they were added in, which is also the README's.
    listing_order: ClassVar[int] = 100
    # A field whose value groups examples that must stay on one side when val.jsonl is carved
    # from train (e.g. SQuAD's article title); None: examples are chosen one by one.
    val_group: ClassVar[str | None] = None
    # Made from any text corpus (`tasks prepare NAME --from CORPUS`, see `corpus_splits`) rather than
    # from a shared dataset (`splits`).
    from_corpus: ClassVar[bool] = False
    # Its choices can be scored against a content-free input (`lmforge eval --calibrate`).
    calibrates: ClassVar[bool] = False
    # Scored on its own dataset file (`eval_records`), found or downloaded, not on a prepared eval.jsonl.
    own_dataset: ClassVar[bool] = False

    @property
    def has_dataset(self) -> bool:
        """Whether `lmforge tasks prepare` can write this task's files (the task overrides `splits`)."""
        return type(self).splits is not Task.splits or self.from_corpus

    def splits(self, root: Path | None) -> dict[str, Iterable[dict]]:
        """The task's dataset as JSONL records per split: "train", "eval" (the scored split) and,
        where the dataset has its own validation split, "val" (else `prepare_task` carves one from
        train); optionally "train_from", a str saying where train came from. Files are read from
        `root` (default `$LMFORGE_DATA_DIR`), the cache, or downloaded (`data.sources.task_file`).

        Prompts end where the model's answer starts; completions begin with a space so that
        BPE tokenizers see a word boundary.
        """
        raise LmforgeError(f"task {self.name!r} has no built-in dataset")

    def eval_records(self, data: Path | None, limit: int | None) -> tuple[Path, list[dict]]:
        """An `own_dataset` task's scored file (`data`, else its pinned dataset) and its first `limit`
        records."""
        raise LmforgeError(f"task {self.name!r} is scored on a prepared eval.jsonl")

    def format_result(self, result: dict) -> str | None:
        """The task's own table for `lmforge eval`; None: the model-beside-baseline table."""
        return None

    def tokenizer_text(self, root: Path | None, prepared: Path | None) -> Iterable[str]:
        """`lmforge tasks text`: the text the task's recipe trains its tokenizer (or first stage) on, in
        pieces to be written one after another. `prepared`: a folder `tasks prepare` wrote, for a text
        made from its train.jsonl."""
        raise LmforgeError(f"task {self.name!r} has no tokenizer text")

    def corpus_splits(self, corpus: str, examples: int | None, seed: int) -> dict[str, Iterable[dict]]:
        """A `from_corpus` task's records per split, as `splits`, made from `corpus` (a named dataset,
        text file or folder): at most `examples` of them (None: the task's default), drawn with `seed`."""
        raise LmforgeError(f"task {self.name!r} is not made from a corpus")

    @abstractmethod
    def evaluate(self, run: EvalRun, records: list[dict]) -> dict:
        """The model beside a trivial baseline: {..., "model", "baseline", "baseline_name",
        "predictions"}, the last one `prediction_line` per record.

        `records` come from `run.eval_file` and hold `fields`.
        """


class DecodingTask(Task):
    """A task answered by decoding a completion after each prompt (greedy or beam search)."""

    baseline_name: ClassVar[str]

    @abstractmethod
    def scores(self, outputs: list[str], records: list[dict]) -> dict:
        """Metrics of one answer per record."""

    @abstractmethod
    def example_scores(self, outputs: list[str], records: list[dict]) -> list[dict]:
        """The metrics of each answer on its own, for the predictions file."""

    @abstractmethod
    def references(self, record: dict) -> dict:
        """{"reference": text} or {"references": [texts]}: what an answer is scored against."""

    @abstractmethod
    def baseline_outputs(self, records: list[dict]) -> list[str]:
        """The trivial baseline's answer to each record."""

    def evaluate(self, run: EvalRun, records: list[dict]) -> dict:
        outputs = [run.decode(r["prompt"]) for r in records]
        per_example = self.example_scores(outputs, records)
        return {
            "samples": [{"prompt": r["prompt"][-200:], "output": o} for r, o in zip(records[:3], outputs)],
            "decoding": run.decoding,
            "model": self.scores(outputs, records),
            "baseline": self.scores(self.baseline_outputs(records), records),
            "baseline_name": self.baseline_name,
            "predictions": [
                prediction_line(i, r, self.references(r), prediction=o, score=s)
                for i, (r, o, s) in enumerate(zip(records, outputs, per_example), start=1)
            ],
        }
