"""`lmforge eval --task T --predictions FILE`: one JSON line per example, checked by external scorers."""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import Config, ModelConfig
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.model import GPT
from lmforge.tasks.base import EvalRun
from tests.tasks.conftest import TEXT, lines, write

# (English source, German reference, what the "model" answers): exact, partly right, wrong, empty.
TRANSLATIONS = [
    ("a dog runs.", "ein Hund rennt.", "ein Hund rennt."),
    ("a man sits on a bench.", "ein Mann sitzt auf einer Bank.", "ein Mann sitzt auf der Bank."),
    ("two girls play in the park.", "zwei Mädchen spielen im Park.", "zwei Mädchen spielen."),
    ("the cat sleeps.", "die Katze schläft.", "der Hund bellt laut."),
    ("a woman reads a book.", "eine Frau liest ein Buch.", ""),
]
# (context, question, reference answers, what the "model" answers).
QUESTIONS = [
    ("Paris is in France.", "Where is Paris?", ["France", "in France"], "France."),
    ("Bob has a cat.", "What has Bob?", ["a cat"], "The Cat"),
    ("The river is long.", "What is long?", ["the river"], "a long river"),
    ("It rains in May.", "When does it rain?", ["in May", "May"], "in june"),
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with one checkpoint of an untrained tiny char model."""
    tokenizer = char_tokenizer(TEXT, specials=[EOT])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    m = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=128, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    ckpt.save_checkpoint(
        tmp_path / "run",
        1,
        GPT(m),
        state={},
        config=Config(model=m),
        tokenizer_file=tmp_path / "tokenizer.json",
        val_loss=1.0,
    )
    return tmp_path / "run"


def answer_with(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> None:
    """Decoding returns a fixed answer per prompt: partly right, so that the scores are not 0 or 100."""
    monkeypatch.setattr(EvalRun, "decode", lambda self, prompt: answers[prompt])


def test_bleu_and_chrf_equal_the_sacrebleu_command_line_on_the_predictions(
    cli, run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    pytest.importorskip("sacrebleu")
    records = [
        {"prompt": f"English: {e}\nGerman:", "completion": f" {d}", "source": e, "reference": d}
        for e, d, _ in TRANSLATIONS
    ]
    write(tmp_path / "mt", records)
    answer_with(monkeypatch, {r["prompt"]: h for r, (_, _, h) in zip(records, TRANSLATIONS)})
    predictions = tmp_path / "predictions.jsonl"
    code, out, err = cli("eval", run_dir, "--task", "multi30k", "--data", tmp_path / "mt", "--json",
                         "--predictions", predictions)  # fmt: skip
    assert code == 0, err
    model = json.loads(out)["model"]
    written = lines(predictions)
    assert [w["id"] for w in written] == [1, 2, 3, 4, 5]
    assert [(w["prompt"], w["reference"], w["prediction"]) for w in written] == [
        (r["prompt"], r["reference"], h) for r, (_, _, h) in zip(records, TRANSLATIONS)
    ]
    assert written[0]["score"]["bleu"] == pytest.approx(100) and written[3]["score"]["chrf"] < 30
    (tmp_path / "ref.txt").write_text("".join(w["reference"] + "\n" for w in written), encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("".join(w["prediction"] + "\n" for w in written), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "sacrebleu", tmp_path / "ref.txt", "-i", tmp_path / "hyp.txt",
         "-m", "bleu", "chrf", "-b", "-w", "6", "-f", "text"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    bleu, chrf = map(float, result.stdout.split())
    assert 0 < bleu < 100 and 0 < chrf < 100
    assert (model["bleu"], model["chrf"]) == (pytest.approx(bleu, abs=1e-6), pytest.approx(chrf, abs=1e-6))


def official_squad_v11(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """EM and F1 exactly as the official SQuAD v1.1 evaluate-v1.1.py computes them (its code, condensed)."""

    def normalize_answer(s: str) -> str:
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())

    def f1_score(prediction: str, ground_truth: str) -> float:
        prediction_tokens = normalize_answer(prediction).split()
        ground_truth_tokens = normalize_answer(ground_truth).split()
        common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        return (2 * precision * recall) / (precision + recall)

    def exact_match_score(prediction: str, ground_truth: str) -> bool:
        return normalize_answer(prediction) == normalize_answer(ground_truth)

    def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):  # noqa: ANN001, ANN202
        return max(metric_fn(prediction, gt) for gt in ground_truths)

    f1 = exact_match = 0
    for prediction, ground_truths in zip(predictions, references):
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    return {"exact_match": 100.0 * exact_match / len(predictions), "f1": 100.0 * f1 / len(predictions)}


def test_squad_em_and_f1_equal_the_official_v11_rules_on_the_predictions(
    cli, run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    records = [
        {"prompt": f"Context: {c}\nQuestion: {q}\nAnswer:", "completion": f" {refs[0]}", "answers": refs,
         "id": f"q{i}"}
        for i, (c, q, refs, _) in enumerate(QUESTIONS)
    ]  # fmt: skip
    write(tmp_path / "qa", records)
    answer_with(monkeypatch, {r["prompt"]: a for r, (_, _, _, a) in zip(records, QUESTIONS)})
    predictions = tmp_path / "predictions.jsonl"
    code, out, err = cli("eval", run_dir, "--task", "squad", "--data", tmp_path / "qa", "--json",
                         "--predictions", predictions)  # fmt: skip
    assert code == 0, err
    written = lines(predictions)
    assert [w["id"] for w in written] == ["q0", "q1", "q2", "q3"]
    assert [w["references"] for w in written] == [refs for _, _, refs, _ in QUESTIONS]
    official = official_squad_v11([w["prediction"] for w in written], [w["references"] for w in written])
    assert 0 < official["exact_match"] < official["f1"] < 100
    assert json.loads(out)["model"] == pytest.approx(official)
    per_example = official_squad_v11([written[2]["prediction"]], [written[2]["references"]])
    assert written[2]["score"] == pytest.approx(per_example)  # "a long river" vs "the river": F1 2/3


def test_sst2_predictions_name_the_labels_and_average_to_the_accuracy(
    cli, run_dir: Path, tmp_path: Path
) -> None:
    records = [
        {"prompt": f"Review: {w}\nSentiment:", "completion": f" {s}", "label": int(s == "positive")}
        for w, s in [("great fun", "positive"), ("awful mess", "negative"), ("fine", "positive")]
    ]
    write(tmp_path / "sst2", records)
    predictions = tmp_path / "predictions.jsonl"
    code, out, err = cli("eval", run_dir, "--task", "sst2", "--data", tmp_path / "sst2", "--json",
                         "--predictions", predictions)  # fmt: skip
    assert code == 0, err
    written = lines(predictions)
    assert [(w["id"], w["reference"]) for w in written] == [(1, "positive"), (2, "negative"), (3, "positive")]
    assert all(w["prediction"] in ("positive", "negative") for w in written)
    accuracy = sum(w["score"]["accuracy"] for w in written) / len(written)
    assert json.loads(out)["model"]["accuracy"] == pytest.approx(accuracy)


def test_predictions_never_replace_a_file_lmforge_did_not_write(cli, run_dir: Path, tmp_path: Path) -> None:
    records = [{"prompt": "Review: fun\nSentiment:", "completion": " positive", "label": 1}] * 2
    write(tmp_path / "sst2", records)
    scored = tmp_path / "sst2" / "eval.jsonl"
    before = scored.read_bytes()
    code, _, err = cli(
        "eval", run_dir, "--task", "sst2", "--data", tmp_path / "sst2", "--predictions", scored
    )
    assert code == 1 and err.count("\n") == 1 and "is not a predictions file" in err
    assert scored.read_bytes() == before
    predictions = tmp_path / "p.jsonl"
    for _ in range(2):  # an earlier predictions file is replaced
        code, _, err = cli(
            "eval", run_dir, "--task", "sst2", "--data", tmp_path / "sst2", "--predictions", predictions
        )
        assert code == 0, err
        assert len(lines(predictions)) == 2
