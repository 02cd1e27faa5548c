"""SQuAD v1.1 extractive question answering: a decoded answer (a span model's: the best span of the
prompt), official EM/F1 beside the context's first sentence.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.tasks import metrics
from lmforge.tasks.base import DecodingTask

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


class Squad(DecodingTask):
    name = "squad"
    fields = ("prompt", "answers")
    listing_order = 3
    baseline_name = "the context's first sentence"
    val_group = "title"  # val.jsonl holds whole articles of the train half

    def splits(self, root: Path) -> dict[str, Iterable[dict]]:
        """SQuAD v1.1 dev, split by article: the first half of the articles trains, the rest evaluates."""
        path = root / "squad-v1.1" / "dev-v1.1.json.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            articles = json.load(f)["data"]
        half = len(articles) // 2
        return {"train": _examples(articles[:half]), "eval": _examples(articles[half:])}

    def scores(self, outputs: list[str], records: list[dict]) -> dict:
        return metrics.squad_scores(outputs, [r["answers"] for r in records])

    def example_scores(self, outputs: list[str], records: list[dict]) -> list[dict]:
        return [metrics.squad_example_scores(o, r["answers"]) for o, r in zip(outputs, records)]

    def references(self, record: dict) -> dict:
        return {"references": record["answers"]}

    def baseline_outputs(self, records: list[dict]) -> list[str]:
        return [first_sentence(r["prompt"]) for r in records]


TASK = Squad()
