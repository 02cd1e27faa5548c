"""`lmforge eval --task`: each task end to end on a tiny fine-tuned model."""

import json
from pathlib import Path

import pytest

from lmforge.data.tokenizer import EOT, char_tokenizer
from tests.conftest import TINY
from tests.tasks.conftest import TEXT, write

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
