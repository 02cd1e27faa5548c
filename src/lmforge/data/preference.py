"""Preference data: pairs of completions of one prompt, the `chosen` one preferred to the `rejected` one.

The JSONL lines are TRL's preference format. Standard: `{"prompt": str, "chosen": str, "rejected": str}`,
each completion trained as `prompt_completion` trains it (the completion, then the end of text).
Conversational: `prompt` a list of messages (ending with the user's) and `chosen` / `rejected` lists of
assistant messages, or, with no `prompt`, two whole conversations that differ in the last assistant
reply; rendered with the run's chat template as `messages` fine-tuning data is. Each side is tokenized
as an SFT example (`data.sft`), so its targets are the completion's tokens only.

A batch of n pairs is one SFT batch of 2n rows, chosen and rejected side by side: rows 2i and 2i + 1
are pair i. A data-parallel rank's share of rows (`Distributed.shard`) is then whole pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from lmforge.data.chat_template import ChatTemplate, Segment, check_messages
from lmforge.data.protocol import Batch
from lmforge.data.sft import (
    Example,
    ExampleBatches,
    collate,
    prompt_completion,
    read_records,
    render_messages,
    tokenize_examples,
)
from lmforge.data.tokenizer import load_tokenizer, vocab_size
from lmforge.errors import LmforgeError

SIDES = ("chosen", "rejected")  # the two completions of a pair, in the order a batch holds them


@dataclass(frozen=True)
class PreferencePair:
    """One prompt's two tokenized completions."""

    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        """The longer side's tokens: what `ExampleBatches` groups batches by."""
        return max(self.chosen.length, self.rejected.length)


def parse_pair(record: object, template: ChatTemplate) -> tuple[list[Segment], list[Segment]]:
    """The chosen and the rejected example of one JSONL record, as segments (ValueError if malformed)."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if not all(side in record for side in SIDES):
        raise ValueError("expected fields 'chosen' and 'rejected' (and 'prompt'), as TRL's preference data")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise ValueError("string 'chosen' and 'rejected' need a string 'prompt'")
        eos = template.special_tokens.get("eos_token", "")
        pair = (prompt_completion(prompt, chosen, eos), prompt_completion(prompt, rejected, eos))
    else:
        chosen, rejected = check_messages(chosen), check_messages(rejected)
        if prompt is None:  # TRL's implicit prompt: the turns both conversations share
            shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
            if shared is None:
                if len(chosen) == len(rejected):
                    raise ValueError("'chosen' and 'rejected' are the same conversation")
                longer, shorter = ("chosen", "rejected") if len(chosen) > len(rejected) else SIDES[::-1]
                raise ValueError(f"{longer!r} continues {shorter!r}: they differ in no turn both have")
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        head = check_messages(prompt)
        pair = tuple(
            _completion_only(render_messages(head + side, template), head) for side in (chosen, rejected)
        )
    # unlike a fine-tuning answer, a side may be the end of text alone: a sampled response that said
    # nothing is one a preference can reject (or choose); a side without even that is no response
    for side, segments in zip(SIDES, pair):
        if not "".join(s.text for s in segments if s.assistant).strip():
            raise ValueError(f"empty {side} completion")
    return pair


def _completion_only(segments: list[Segment], prompt: list[dict[str, str]]) -> list[Segment]:
    """`segments` with the prompt's own assistant turns (one segment each) no longer trained."""
    earlier = sum(m["role"] == "assistant" for m in prompt)
    out = []
    for segment in segments:
        if segment.assistant and earlier:
            earlier -= 1
            segment = Segment(segment.text, False)
        out.append(segment)
    return out


def read_pairs(
    path: Path, tokenizer: Tokenizer, max_tokens: int, *, template: ChatTemplate, on_bad_line: str
) -> list[PreferencePair]:
    """The pairs of a JSONL file, tokenized; bad lines raise or are skipped, as `read_records` says."""
    pairs = read_records(path, on_bad_line, lambda record: parse_pair(record, template))
    chosen = tokenize_examples([p[0] for p in pairs], tokenizer, max_tokens, where=path)
    rejected = tokenize_examples([p[1] for p in pairs], tokenizer, max_tokens, where=path)
    return [PreferencePair(c, r) for c, r in zip(chosen, rejected)]


def collate_pairs(pairs: list[PreferencePair], max_length: int | None = None) -> Batch:
    """An SFT batch of 2n rows: pair i's chosen side at row 2i, its rejected side at row 2i + 1."""
    return collate([e for p in pairs for e in (p.chosen, p.rejected)], max_length)


class PreferenceData:
    """`train.jsonl` and `val.jsonl` of preference pairs, tokenized with a given tokenizer.json.

    Satisfies `TrainingData` (lmforge.data.protocol) like `SFTData`: train.objective = "dpo" or "simpo"
    trains on it through the same loop, and chooses checkpoints on val.jsonl's preference loss.
    """

    def __init__(
        self,
        directory: Path,
        tokenizer_file: Path,
        block_size: int,
        *,
        on_bad_line: str = "error",
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self.dir, self.tokenizer_file = directory, tokenizer_file
        tokenizer = load_tokenizer(tokenizer_file)
        self.chat_template = chat_template or ChatTemplate.default(tokenizer)
        self.vocab_size = vocab_size(tokenizer)
        if not (directory / "val.jsonl").is_file():
            raise LmforgeError(
                f"{directory / 'val.jsonl'}: not found; preference tuning selects checkpoints on the "
                "held-out pairs of val.jsonl (beside train.jsonl)"
            )
        read = dict(template=self.chat_template, on_bad_line=on_bad_line)
        self.train = read_pairs(directory / "train.jsonl", tokenizer, block_size + 1, **read)
        self.val = read_pairs(directory / "val.jsonl", tokenizer, block_size + 1, **read)

    def train_batches(self, block_size: int, batch_size: int, seed: int) -> ExampleBatches:
        """`batch_size` pairs (2 x batch_size rows) at a time, reshuffled every epoch."""
        return ExampleBatches(self.train, batch_size, seed, max_length=block_size, collate=collate_pairs)

    def eval_batches(self, block_size: int, batch_size: int) -> Iterator[Batch]:
        """The val pairs in file order, `batch_size` pairs at a time."""
        for start in range(0, len(self.val), batch_size):
            yield collate_pairs(self.val[start : start + batch_size], block_size)

    def bytes_per_token(self, split: str = "val") -> float | None:
        """Always None: a preference loss has no bits-per-byte."""
        return None
