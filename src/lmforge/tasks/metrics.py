"""Task metrics, computed with the field's reference implementations where they exist.

BLEU and chrF come from `sacrebleu` and ROUGE from `rouge-score` (the `eval` extra); SQuAD
exact match and F1 follow the official v1.1 evaluation script's normalisation; accuracy and
macro-F1 are plain counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from lmforge.errors import LmforgeError


def accuracy_and_macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, and the mean F1 over every class that is predicted or true (as fractions)."""
    if len(predictions) != len(labels) or not labels:
        raise LmforgeError(f"{len(predictions)} predictions for {len(labels)} labels")
    classes = sorted(set(labels) | set(predictions))
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": sum(p == y for p, y in zip(predictions, labels)) / len(labels),
        "macro_f1": sum(f1s) / len(f1s),
    }


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_example_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """One question's exact match and F1 in percent, each the maximum over its reference answers."""
    em = max(normalize_answer(prediction) == normalize_answer(a) for a in answers)
    return {"exact_match": 100.0 * em, "f1": 100 * max(_f1(prediction, a) for a in answers)}


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent: the mean over questions of `squad_example_scores`."""
    if len(predictions) != len(answers) or not answers:
        raise LmforgeError(f"{len(predictions)} predictions for {len(answers)} questions")
    scores = [squad_example_scores(p, refs) for p, refs in zip(predictions, answers)]
    return {name: sum(s[name] for s in scores) / len(scores) for name in ("exact_match", "f1")}


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise LmforgeError("translation metrics need sacrebleu: pip install 'lmforge[eval]'") from None
    return sacrebleu


def sentence_translation_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """One sentence's BLEU (sacrebleu's sentence BLEU, smoothed with exp) and chrF: for reading
    errors; the corpus scores are not their mean."""
    sacrebleu = _sacrebleu()
    return {
        "bleu": sacrebleu.sentence_bleu(hypothesis, [reference]).score,
        "chrf": sacrebleu.sentence_chrf(hypothesis, [reference]).score,
    }


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """Corpus BLEU and chrF with sacrebleu's defaults, and their signatures."""
    sacrebleu = _sacrebleu()
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def rouge_example_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F-measure in percent of each prediction (rouge-score, with stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LmforgeError("ROUGE needs rouge-score: pip install 'lmforge[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return [
        {name: 100 * score.fmeasure for name, score in scorer.score(reference, prediction).items()}
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in percent (rouge-score, with stemming)."""
    scores = rouge_example_scores(predictions, references)
    return {name: sum(s[name] for s in scores) / len(scores) for name in ("rouge1", "rouge2", "rougeL")}
