"""SST-2 sentiment (GLUE): the label whose verbalisation (" negative" / " positive") the model
finds more likely after the prompt, not free generation; accuracy and macro-F1 beside the
majority class.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tasks import metrics
from lmforge.tasks.base import EvalRun, Task, prediction_line, read_eval

SST2_LABELS = ("negative", "positive")
CONTENT_FREE = "N/A"  # the review `--calibrate` scores the labels after (Zhao et al. 2021)


def sst2_prompt(sentence: str) -> str:
    return f"Review: {sentence.strip()}\nSentiment:"


def _read_tsv(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def _sst2_examples(path: Path) -> Iterator[dict]:
    for line_no, row in enumerate(_read_tsv(path), start=2):
        if row.get("label") not in ("0", "1"):
            raise LmforgeError(f"{path}:{line_no}: label must be 0 or 1, got {row.get('label')!r}")
        label = int(row["label"])
        yield {"prompt": sst2_prompt(row["sentence"]), "completion": " " + SST2_LABELS[label], "label": label}


def _check_labels(labels: list[int], path: Path) -> None:
    if not set(labels) <= {0, 1}:
        raise LmforgeError(
            f"{path}: labels {sorted(set(labels) - {0, 1})} are outside the label set 0/1 "
            f"({', '.join(SST2_LABELS)})"
        )


def _majority_label(data_dir: Path, records: list[dict]) -> int:
    """The most common label of train.jsonl beside eval.jsonl, else of the evaluated records."""
    train = data_dir / "train.jsonl"
    majority_source = read_eval(train, None) if train.is_file() else records
    return Counter(r["label"] for r in majority_source).most_common(1)[0][0]


LABEL_CHOICES = [" " + name for name in SST2_LABELS]  # the completions scored, in label order


def label_prior(run: EvalRun) -> list[float]:
    """What `--calibrate` subtracts from each label's log-probability: its log-probability after the
    content-free review (a label the model favours whatever the review says loses that edge); else 0."""
    if not run.calibrate:
        return [0.0] * len(LABEL_CHOICES)
    return run.choice_log_probs(sst2_prompt(CONTENT_FREE), LABEL_CHOICES)


class SST2(Task):
    name = "sst2"
    fields = ("prompt", "label")
    listing_order = 1
    calibrates = True

    def splits(self, root: Path | None) -> dict[str, Iterable[dict]]:
        """GLUE SST-2: train.tsv for training, dev.tsv (labelled) for evaluation."""
        from lmforge.data.sources import task_file  # lmforge.data imports torch: not at import time

        return {
            "train": _sst2_examples(task_file("sst2", "train.tsv", root=root)),
            "eval": _sst2_examples(task_file("sst2", "dev.tsv", root=root)),
        }

    def tokenizer_text(self, root: Path | None, prepared: Path | None) -> Iterator[str]:
        """Every train.tsv sentence on its own line, then the words the prompts and labels add."""
        from lmforge.data.sources import task_file

        for row in _read_tsv(task_file("sst2", "train.tsv", root=root)):
            yield row["sentence"].strip() + "\n"
        yield sst2_prompt("") + " " + " ".join(reversed(SST2_LABELS)) + "\n"  # "... positive negative"

    def evaluate(self, run: EvalRun, records: list[dict]) -> dict:
        labels = [r["label"] for r in records]
        _check_labels(labels, run.eval_file)
        prior, predictions = label_prior(run), []
        for r in records:
            scores = [s - p for s, p in zip(run.choice_log_probs(r["prompt"], LABEL_CHOICES), prior)]
            predictions.append(max(range(len(scores)), key=scores.__getitem__))
        majority = _majority_label(run.data_dir, records)
        return {
            "model": metrics.accuracy_and_macro_f1(predictions, labels),
            "baseline": metrics.accuracy_and_macro_f1([majority] * len(labels), labels),
            "baseline_name": f"majority class ({SST2_LABELS[majority]})",
            "predictions": [
                prediction_line(
                    i,
                    r,
                    {"reference": SST2_LABELS[r["label"]]},
                    prediction=SST2_LABELS[p],
                    score={"accuracy": float(p == r["label"])},
                )
                for i, (r, p) in enumerate(zip(records, predictions), start=1)
            ],
        }


TASK = SST2()
