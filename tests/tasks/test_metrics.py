"""Metric wiring on hand-made examples whose scores are known."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.tasks.metrics import (
    accuracy_and_macro_f1,
    normalize_answer,
    rouge_scores,
    squad_scores,
    translation_scores,
)


def test_accuracy_and_macro_f1() -> None:
    scores = accuracy_and_macro_f1([1, 1, 0, 0], [1, 0, 0, 0])
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)  # class 0: F1 0.8, class 1: F1 2/3
    with pytest.raises(LmforgeError, match="3 predictions for 4 labels"):
        accuracy_and_macro_f1([1, 1, 0], [1, 0, 0, 0])


def test_squad_official_normalisation_and_scores() -> None:
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    scores = squad_scores(["The Broncos!", "Denver"], [["Denver Broncos", "broncos"], ["Denver Broncos"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # "Denver": precision 1, recall 1/2
    assert squad_scores(["nothing alike"], [["Denver"]]) == {"exact_match": 0.0, "f1": 0.0}


def test_translation_scores_use_sacrebleu() -> None:
    pytest.importorskip("sacrebleu")
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    perfect = translation_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert translation_scores(["xyz qqq", "vvv www"], refs)["bleu"] == pytest.approx(0.0)
    partial = translation_scores(["Ein Mann fährt Auto.", "Zwei Hunde spielen im Schnee."], refs)
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100


def test_rouge_scores_use_rouge_score() -> None:
    pytest.importorskip("rouge_score")
    assert rouge_scores(["the cat sat"], ["the cat sat"]) == {
        "rouge1": 100.0,
        "rouge2": 100.0,
        "rougeL": 100.0,
    }
    scores = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)  # precision 1, recall 3/6
    assert scores["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)  # 2 of 2 bigrams, recall 2/5
