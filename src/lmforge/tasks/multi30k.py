"""Multi30k English→German translation: decoded translations (greedy or beam search), sacreBLEU
and chrF beside copying the source sentence.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tasks import metrics
from lmforge.tasks.base import DecodingTask


def translation_prompt(english: str) -> str:
    return f"English: {english.strip()}\nGerman:"


def _parallel(root: Path | None, split: str) -> Iterator[dict]:
    from lmforge.data.sources import task_file  # lmforge.data imports torch: not at import time

    en_path = task_file("multi30k", f"{split}.en.gz", root=root)
    de_path = task_file("multi30k", f"{split}.de.gz", root=root)
    with gzip.open(en_path, "rt", encoding="utf-8") as en, gzip.open(de_path, "rt", encoding="utf-8") as de:
        for line_no, (source, target) in enumerate(zip(en, de, strict=True), start=1):
            source, target = source.strip(), target.strip()
            if not source or not target:
                raise LmforgeError(f"{en_path}:{line_no}: empty sentence in the parallel text")
            yield {
                "prompt": translation_prompt(source),
                "completion": " " + target,
                "source": source,
                "reference": target,
            }


class Multi30k(DecodingTask):
    name = "multi30k"
    fields = ("prompt", "source", "reference")
    listing_order = 2
    baseline_name = "copy the source sentence"

    def splits(self, root: Path | None) -> dict[str, Iterable[dict]]:
        """Multi30k en→de: train for training, val for checkpoint selection, test_2016_flickr scored."""
        return {
            "train": _parallel(root, "train"),
            "val": _parallel(root, "val"),
            "eval": _parallel(root, "test_2016_flickr"),
        }

    def tokenizer_text(self, root: Path | None, prepared: Path | None) -> Iterator[str]:
        """The English then the German training sentences, one a line, then the prompt's words."""
        from lmforge.data.sources import task_file

        for language in ("en", "de"):
            with gzip.open(
                task_file("multi30k", f"train.{language}.gz", root=root), "rt", encoding="utf-8"
            ) as f:
                yield from (line.strip() + "\n" for line in f)
        yield "English: \nGerman:\n"

    def scores(self, outputs: list[str], records: list[dict]) -> dict:
        return metrics.translation_scores(outputs, [r["reference"] for r in records])

    def example_scores(self, outputs: list[str], records: list[dict]) -> list[dict]:
        return [metrics.sentence_translation_scores(o, r["reference"]) for o, r in zip(outputs, records)]

    def references(self, record: dict) -> dict:
        return {"reference": record["reference"]}

    def baseline_outputs(self, records: list[dict]) -> list[str]:
        return [r["source"] for r in records]


TASK = Multi30k()
