"""SQuAD v1.1 extractive question answering: a decoded answer (a span model's: the best span of the
prompt), official EM/F1 beside the context's first sentence.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.files import gzipped_suffix
from lmforge.tasks import metrics
from lmforge.tasks.base import DecodingTask

logger = logging.getLogger(__name__)
CONTEXT_LABEL = "\nContext: "


def squad_prompt(context: str, question: str) -> str:
    # The question comes first too: a causal model reads the context already knowing what it
    # looks for. It is repeated at the end, where it survives when a long context is cut.
    question = question.strip()
    return f"Question: {question}{CONTEXT_LABEL}{context.strip()}\nQuestion: {question}\nAnswer:"


def answer_in_prompt(prompt: str, context: str, answer_start: int) -> int:
    """Where the answer that starts at `answer_start` in `context` starts in `squad_prompt`'s prompt:
    the `answer_start` of a record, which a span head (model.head = "span") learns to point at."""
    stripped = len(context) - len(context.lstrip())
    return prompt.index(CONTEXT_LABEL) + len(CONTEXT_LABEL) + answer_start - stripped


def first_sentence(prompt: str) -> str:
    """The first sentence of a prompt's context: the baseline's answer."""
    context = prompt.split("Context:", 1)[-1].split("\nQuestion:")[0].strip()
    return re.split(r"(?<=[.!?])\s", context, maxsplit=1)[0]


def _examples(articles: list[dict]) -> Iterator[dict]:
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                prompt = squad_prompt(paragraph["context"], qa["question"])
                yield {
                    "prompt": prompt,
                    "completion": " " + answers[0],
                    "answer_start": answer_in_prompt(
                        prompt, paragraph["context"], qa["answers"][0]["answer_start"]
                    ),
                    "answers": answers,
                    "id": qa["id"],
                    "title": article["title"],
                }


OFFICIAL = "train-v1.1.json; eval: the whole dev-v1.1.json"
DEV_HALF = "the first half of dev-v1.1.json's articles (train-v1.1.json not found); eval: the other half"


def _articles(path: Path) -> list[dict]:
    gzipped = gzipped_suffix(path) is not None
    with gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8") as f:
        return json.load(f)["data"]


def _official_train(root: Path | None) -> Path | None:
    """train-v1.1.json found locally, else downloaded; None offline (LMFORGE_OFFLINE=1) or when the
    network fails (then a warning says so). A copy with the wrong sha256 is an error, not a fallback."""
    import os

    from lmforge.data.sources import DownloadError, local_copy, task_dataset, task_file

    pinned = task_dataset("squad-v1.1", "train-v1.1.json")
    if (found := local_copy(pinned, root)) is not None or os.environ.get("LMFORGE_OFFLINE") == "1":
        return found
    try:
        return task_file("squad-v1.1", "train-v1.1.json", root=root)
    except DownloadError as exc:
        logger.warning(f"{exc}; training on half of the dev articles instead")
        return None


class Squad(DecodingTask):
    name = "squad"
    fields = ("prompt", "answers")
    listing_order = 3
    baseline_name = "the context's first sentence"
    val_group = "title"  # val.jsonl holds whole articles of the train half

    def splits(self, root: Path | None) -> dict[str, Iterable[dict]]:
        """The official train-v1.1.json trains and the whole dev set evaluates, where train-v1.1.json
        is found or can be downloaded; else SQuAD v1.1 dev split by article: the first half of the
        articles trains, the rest evaluates. "train_from" says which."""
        from lmforge.data.sources import task_file

        dev = _articles(task_file("squad-v1.1", "dev-v1.1.json", "dev-v1.1.json.gz", root=root))
        train = _official_train(root)
        if train is not None:
            return {"train": _examples(_articles(train)), "eval": _examples(dev), "train_from": OFFICIAL}
        half = len(dev) // 2
        return {"train": _examples(dev[:half]), "eval": _examples(dev[half:]), "train_from": DEV_HALF}

    def tokenizer_text(self, root: Path | None, prepared: Path | None) -> Iterator[str]:
        """Stage 1 of the from-scratch recipe: each train.jsonl example of `prepared` (prompt and
        answer), separated by blank lines."""
        from lmforge.tasks.base import read_eval

        if prepared is None:
            raise LmforgeError("squad's text is made from a prepared task folder: give --prepared DIR")
        for i, record in enumerate(read_eval(prepared / "train.jsonl", None)):
            yield ("\n\n" if i else "") + record["prompt"] + record["completion"]
        yield "\n"

    def scores(self, outputs: list[str], records: list[dict]) -> dict:
        return metrics.squad_scores(outputs, [r["answers"] for r in records])

    def example_scores(self, outputs: list[str], records: list[dict]) -> list[dict]:
        return [metrics.squad_example_scores(o, r["answers"]) for o, r in zip(outputs, records)]

    def references(self, record: dict) -> dict:
        return {"references": record["answers"]}

    def baseline_outputs(self, records: list[dict]) -> list[str]:
        return [first_sentence(r["prompt"]) for r in records]


TASK = Squad()
