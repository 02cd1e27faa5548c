"""SQuAD: the shared dev set split by article, and the first-sentence baseline."""

from pathlib import Path

from lmforge.tasks import prepare_task
from lmforge.tasks.squad import first_sentence
from tests.tasks.conftest import lines


def test_squad_is_split_by_article(shared_data: Path, tmp_path: Path) -> None:
    counts = prepare_task("squad", tmp_path / "qa")
    assert counts["train"] + counts["eval"] == 10_570
    train, held_out = lines(tmp_path / "qa" / "train.jsonl"), lines(tmp_path / "qa" / "eval.jsonl")
    assert not {e["title"] for e in train} & {e["title"] for e in held_out}
    assert len({e["title"] for e in train}) == 24 and train[0]["title"] == "Super_Bowl_50"
    assert all(
        e["completion"] == " " + e["answers"][0] and e["answers"][0] in e["prompt"] for e in train[:50]
    )
    assert prepare_task("squad", tmp_path / "again") == counts  # deterministic


def test_first_sentence_baseline() -> None:
    assert first_sentence("Context: One two. Three four.\nQuestion: q?\nAnswer:") == "One two."
    assert first_sentence("Question: q?\nContext: One two. Three four.\nQuestion: q?\nAnswer:") == "One two."
