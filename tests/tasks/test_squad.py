"""SQuAD: the shared dev set split by article, and the first-sentence baseline."""

import gzip
import json
from pathlib import Path

from lmforge.tasks import prepare_task
from lmforge.tasks.squad import first_sentence
from tests.conftest import DATASETS
from tests.tasks.conftest import lines


def test_squad_is_split_by_article(shared_data: Path, tmp_path: Path) -> None:
    prepared = prepare_task("squad", tmp_path / "qa")
    with gzip.open(shared_data / "squad-v1.1" / "dev-v1.1.json.gz", "rt", encoding="utf-8") as f:
        articles = json.load(f)["data"]
    questions = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
    counts = prepared.counts
    assert counts["train"] + counts["val"] + counts["eval"] == questions
    train, val, held_out = (lines(tmp_path / "qa" / f"{s}.jsonl") for s in ("train", "val", "eval"))
    titles = [{e["title"] for e in split} for split in (train, val, held_out)]
    assert not titles[0] & titles[2] and not titles[1] & titles[2] and not titles[0] & titles[1]
    # The first half of the articles train; 5% of them (at least one, seeded) are carved out whole as val.
    half = len(articles) // 2
    val_articles = max(1, round(half * 0.05))
    assert (len(titles[0]), len(titles[1])) == (half - val_articles, val_articles)
    assert prepared.val_from == "0.05 of train by title, seed 0"
    if DATASETS.real:
        assert (questions, half, val_articles) == (10_570, 24, 1)  # SOURCE.md: 48 articles
    assert all(
        e["completion"] == " " + e["answers"][0] and e["answers"][0] in e["prompt"] for e in train[:50]
    )
    # answer_start: the annotated occurrence in the context (what a span head learns to point at)
    for e in train + val + held_out:
        at, answer = e["answer_start"], e["answers"][0]
        assert e["prompt"][at : at + len(answer)] == answer and at > e["prompt"].index("\nContext: ")
    assert prepare_task("squad", tmp_path / "again") == prepared  # deterministic


def test_first_sentence_baseline() -> None:
    assert first_sentence("Context: One two. Three four.\nQuestion: q?\nAnswer:") == "One two."
    assert first_sentence("Question: q?\nContext: One two. Three four.\nQuestion: q?\nAnswer:") == "One two."
