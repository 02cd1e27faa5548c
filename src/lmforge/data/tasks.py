"""`lmforge tasks prepare`: the shared task datasets as prompt/completion JSONL files.

Each converter writes `train.jsonl` and `eval.jsonl` (plus task fields the evaluators use:
`label`, `source`/`reference`, `answers`) into one folder. Prompts end where the model's
answer starts; completions begin with a space so that BPE tokenizers see a word boundary.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lmforge.data.sources import data_dir
from lmforge.errors import LmforgeError
from lmforge.staging import staged_folder

SST2_LABELS = ("negative", "positive")


def sst2_prompt(sentence: str) -> str:
    return f"Review: {sentence.strip()}\nSentiment:"


def translation_prompt(english: str) -> str:
    return f"English: {english.strip()}\nGerman:"


def squad_prompt(context: str, question: str) -> str:
    # The question comes first too: a causal model reads the context already knowing what it
    # looks for. It is repeated at the end, where it survives when a long context is cut.
    question = question.strip()
    return f"Question: {question}\nContext: {context.strip()}\nQuestion: {question}\nAnswer:"


def _read_tsv(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def _sst2_examples(path: Path) -> Iterator[dict]:
    for line_no, row in enumerate(_read_tsv(path), start=2):
        if row.get("label") not in ("0", "1"):
            raise LmforgeError(f"{path}:{line_no}: label must be 0 or 1, got {row.get('label')!r}")
        label = int(row["label"])
        yield {"prompt": sst2_prompt(row["sentence"]), "completion": " " + SST2_LABELS[label], "label": label}


def sst2(root: Path) -> dict[str, Iterable[dict]]:
    """GLUE SST-2: train.tsv for training, dev.tsv (labelled) for evaluation."""
    return {
        "train": _sst2_examples(root / "sst2" / "train.tsv"),
        "eval": _sst2_examples(root / "sst2" / "dev.tsv"),
    }


def _parallel(root: Path, split: str) -> Iterator[dict]:
    en_path, de_path = root / "multi30k" / f"{split}.en.gz", root / "multi30k" / f"{split}.de.gz"
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


def multi30k(root: Path) -> dict[str, Iterable[dict]]:
    """Multi30k en→de: train for training, val for held-out loss, test_2016_flickr for evaluation."""
    return {
        "train": _parallel(root, "train"),
        "valid": _parallel(root, "val"),
        "eval": _parallel(root, "test_2016_flickr"),
    }


def squad(root: Path) -> dict[str, Iterable[dict]]:
    """SQuAD v1.1 dev, split by article: the first half of the articles trains, the rest evaluates."""
    path = root / "squad-v1.1" / "dev-v1.1.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        articles = json.load(f)["data"]
    half = len(articles) // 2

    def examples(chosen: list[dict]) -> Iterator[dict]:
        for article in chosen:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [a["text"] for a in qa["answers"]]
                    yield {
                        "prompt": squad_prompt(paragraph["context"], qa["question"]),
                        "completion": " " + answers[0],
                        "answers": answers,
                        "id": qa["id"],
                        "title": article["title"],
                    }

    return {"train": examples(articles[:half]), "eval": examples(articles[half:])}


TASKS: dict[str, Callable[[Path], dict[str, Iterable[dict]]]] = {
    "sst2": sst2,
    "multi30k": multi30k,
    "squad": squad,
}


def prepare_task(
    name: str, out: Path, source_dir: Path | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Write the task's JSONL splits into `out`; return the number of examples per split."""
    if name not in TASKS:
        raise LmforgeError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    root = source_dir or data_dir()
    if root is None:
        raise LmforgeError("set $LMFORGE_DATA_DIR (or --data-dir) to the folder holding the shared datasets")
    counts = {}
    try:
        with staged_folder(out, overwrite) as staging:
            for split, examples in TASKS[name](root).items():
                with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    counts[split] = 0
                    for example in examples:
                        f.write(json.dumps(example, ensure_ascii=False) + "\n")
                        counts[split] += 1
    except FileNotFoundError as exc:
        raise LmforgeError(f"{exc.filename}: not found (is the data folder {root} complete?)") from None
    return counts
