"""`lmforge eval --task`: each task end to end on a tiny fine-tuned model, plus the scoring pieces."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.eval.tasks import choice_log_probs, first_sentence
from lmforge.model import GPT
from tests.conftest import TINY

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöüß .,:;!?'-\n0123456789"


def test_choice_log_probs_are_the_sum_over_the_choice_tokens() -> None:
    tokenizer = char_tokenizer(TEXT)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=32, vocab_size=tokenizer.get_vocab_size())
    ).eval()
    prompt, choices = "Review: good\nSentiment:", [" no", " yes"]
    scores = choice_log_probs(model, tokenizer, prompt, choices, torch.device("cpu"))
    for choice, score in zip(choices, scores):
        ids = tokenizer.encode(prompt + choice).ids
        logits, _ = model(torch.tensor([ids[:-1]]))
        expected = torch.log_softmax(logits[0], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][
            -len(choice) :
        ]
        assert score == pytest.approx(expected.sum().item(), rel=1e-5)


def test_first_sentence_baseline() -> None:
    assert first_sentence("Context: One two. Three four.\nQuestion: q?\nAnswer:") == "One two."
    assert first_sentence("Question: q?\nContext: One two. Three four.\nQuestion: q?\nAnswer:") == "One two."


def write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


TASK_DATA = {
    "sst2": [
        {"prompt": f"Review: {w}\nSentiment:", "completion": f" {s}", "label": int(s == "positive")}
        for w, s in [("great fun", "positive"), ("awful mess", "negative")] * 10
    ],
    "multi30k": [
        {"prompt": f"English: {e}\nGerman:", "completion": f" {d}", "source": e, "reference": d}
        for e, d in [("a dog runs.", "ein Hund rennt."), ("a man sits.", "ein Mann sitzt.")] * 10
    ],
    "squad": [
        {"prompt": f"Context: {c}\nQuestion: {q}\nAnswer:", "completion": f" {a}", "answers": [a]}
        for c, q, a in [
            ("Paris is in France. It is big.", "where is Paris?", "France"),
            ("Bob has a cat. It is old.", "what has Bob?", "a cat"),
        ]
        * 10
    ],
    "generate": [
        {"prompt": f"Say: {t}\n", "completion": f" {t}"} for t in ["hello there", "good night"] * 10
    ],
}


@pytest.mark.parametrize("task", sorted(TASK_DATA))
def test_each_task_evaluates_a_fine_tuned_model(cli, tmp_path: Path, task: str) -> None:
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    data = tmp_path / task
    write(data, TASK_DATA[task])
    char_tokenizer(TEXT, specials=[EOT]).save(str(tmp_path / "tok.json"))
    args = [
        "finetune",
        "--out",
        tmp_path / "run",
        "--set",
        f"data.dir={data}",
        "--set",
        f"data.tokenizer={tmp_path / 'tok.json'}",
    ]
    for item in [
        *TINY,
        "model.block_size=128",
        "train.max_steps=300",
        "train.eval_interval=0",
        "optim.lr=1e-2",
        "train.checkpoint_interval=0",
    ]:
        args += ["--set", item]
    code, _, err = cli(*args)
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "run", "--task", task, "--json", "--max-new-tokens", "20")
    assert code == 0, err
    result = json.loads(out)
    assert result["examples"] == 20 and result["baseline_name"]
    headline = {"sst2": "accuracy", "multi30k": "bleu", "squad": "f1", "generate": "rouge1"}[task]
    assert result["model"][headline] > result["baseline"][headline], (
        result
    )  # a memorised toy task beats the baseline
    code, out, _ = cli("eval", tmp_path / "run", "--task", task, "--beam-size", "3", "--limit", "4")
    assert code == 0 and "baseline" in out and "4 examples" in out


def test_label_set_mismatch_is_an_error(cli, tmp_path: Path) -> None:
    write(tmp_path / "bad", [{"prompt": "Review: x\nSentiment:", "completion": " positive", "label": 3}])
    char_tokenizer(TEXT, specials=[EOT]).save(str(tmp_path / "tok.json"))
    args = [
        "finetune",
        "--out",
        tmp_path / "run",
        "--set",
        f"data.dir={tmp_path / 'bad'}",
        "--set",
        f"data.tokenizer={tmp_path / 'tok.json'}",
        *sum((["--set", s] for s in TINY), []),
        "--set",
        "train.max_steps=2",
    ]
    assert cli(*args)[0] == 0
    code, _, err = cli("eval", tmp_path / "run", "--task", "sst2")
    assert code == 1 and "labels [3] are outside the label set 0/1" in err
