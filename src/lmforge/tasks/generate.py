"""Free generation on any prompt/completion eval.jsonl (no built-in dataset): decoded
completions, ROUGE-1/2/L beside copying the prompt.
"""

from __future__ import annotations

from lmforge.tasks import metrics
from lmforge.tasks.base import DecodingTask


class Generate(DecodingTask):
    name = "generate"
    fields = ("prompt", "completion")
    listing_order = 4
    baseline_name = "copy the prompt"

    def scores(self, outputs: list[str], records: list[dict]) -> dict:
        return metrics.rouge_scores(outputs, [r["completion"].strip() for r in records])

    def example_scores(self, outputs: list[str], records: list[dict]) -> list[dict]:
        return metrics.rouge_example_scores(outputs, [r["completion"].strip() for r in records])

    def references(self, record: dict) -> dict:
        return {"reference": record["completion"].strip()}

    def baseline_outputs(self, records: list[dict]) -> list[str]:
        return [r["prompt"] for r in records]


TASK = Generate()
