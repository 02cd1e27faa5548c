"""Zero-shot SST-2: a pretrained model that never saw the task picks the label whose continuation it
finds more likely; the tests recompute those log-probabilities from the model's forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.inference import InferenceSession, load
from lmforge.tasks.sst2 import CONTENT_FREE, sst2_prompt
from tests.conftest import TINY
from tests.tasks.conftest import lines

REVIEWS = [
    ("a dark and stormy night of a film .", 0),
    ("it was the best of times .", 1),
    ("handsome , clever , and rich .", 1),
    ("the rain fell in torrents for two hours .", 0),
    ("call me bored .", 0),
    ("a truth universally acknowledged : this is fun .", 1),
    ("never mind how long , it is precisely right .", 1),
    ("the worst of times .", 0),
]


@pytest.fixture(scope="module")
def base_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy base model: a few pretraining steps on Shakespeare's characters, never fine-tuned."""
    run = tmp_path_factory.mktemp("zero-shot") / "base"
    settings = [*TINY, f"data.dir={char_data}", "model.block_size=128", "train.max_steps=3"]
    assert main(["train", "--out", str(run), *[a for s in settings for a in ("--set", s)]]) == 0
    return run


def write_sst2(folder: Path) -> None:
    folder.mkdir()
    records = [
        {"prompt": sst2_prompt(text), "completion": f" {('negative', 'positive')[label]}", "label": label}
        for text, label in REVIEWS
    ]
    for split in ("train", "eval"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def label_log_probs(session: InferenceSession, prompt: str) -> list[float]:
    """log p(" negative" | prompt), log p(" positive" | prompt): one unpadded forward per label."""
    tokenizer = session.tokenizer
    context = tokenizer.encode(prompt, add_special_tokens=False).ids
    scores = []
    for label in (" negative", " positive"):
        target = tokenizer.encode(label, add_special_tokens=False).ids
        ids = torch.tensor([context + target])
        with torch.no_grad():
            log_probs = torch.log_softmax(session.model(ids[:, :-1])[0].float(), dim=-1)[0]
        scores.append(sum(log_probs[len(context) - 1 + i, t].item() for i, t in enumerate(target)))
    return scores


@pytest.mark.parametrize("calibrate", [False, True])
def test_zero_shot_sst2_picks_the_label_the_model_finds_more_likely(
    cli, base_run: Path, tmp_path: Path, calibrate: bool
) -> None:
    write_sst2(tmp_path / "sst2")
    code, out, err = cli("eval", base_run, "--task", "sst2", "--data", tmp_path / "sst2", "--json",
                         "--predictions", tmp_path / "predictions.jsonl",
                         *(["--calibrate"] if calibrate else []))  # fmt: skip
    assert code == 0, err
    result, written = json.loads(out), lines(tmp_path / "predictions.jsonl")
    session = load(base_run, "best", "cpu")
    prior = label_log_probs(session, sst2_prompt(CONTENT_FREE)) if calibrate else [0.0, 0.0]
    for (text, label), line in zip(REVIEWS, written, strict=True):
        negative, positive = label_log_probs(session, sst2_prompt(text))
        expected = "positive" if positive - prior[1] > negative - prior[0] else "negative"
        assert line["prediction"] == expected
        assert line["score"]["accuracy"] == float(expected == ("negative", "positive")[label])
    matches = sum(line["score"]["accuracy"] for line in written)
    assert result["model"]["accuracy"] == pytest.approx(matches / len(REVIEWS))
    assert result["baseline"]["accuracy"] == 0.5 and result["baseline_name"].startswith("majority class")


def test_calibrate_is_refused_for_tasks_that_decode(cli, base_run: Path, tmp_path: Path) -> None:
    write_sst2(tmp_path / "sst2")
    code, _, err = cli("eval", base_run, "--task", "squad", "--data", tmp_path / "sst2", "--calibrate")
    assert code == 1 and "--calibrate applies to tasks that score label choices" in err
