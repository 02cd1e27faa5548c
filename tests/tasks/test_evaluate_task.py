"""`lmforge eval --task`: each task end to end on a tiny fine-tuned model."""

import json
from pathlib import Path

import pytest

from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.tasks import answer_cap
from tests.conftest import TINY, random_char_run
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


@pytest.mark.parametrize(("block_size", "cap"), [(1024, 64), (128, 64), (96, 48), (32, 16), (2, 1)])
def test_the_answer_cap_defaults_to_64_at_most_half_the_block(block_size: int, cap: int) -> None:
    assert answer_cap(None, block_size) == cap


def test_a_small_model_decodes_with_the_default_cap_and_refuses_one_that_leaves_no_prompt(
    cli, tmp_path: Path
) -> None:
    pytest.importorskip("rouge_score")
    run = random_char_run(tmp_path / "run", TEXT, n_layer=1, d_model=16, block_size=32)
    write(tmp_path / "task", TASK_DATA["generate"][:4])
    common = ["--task", "generate", "--data", tmp_path / "task", "--device", "cpu", "--json"]
    code, out, err = cli("eval", run, *common)
    assert code == 0, err  # decoded with 16 new tokens: the other 16 hold the prompt's end
    assert json.loads(out)["examples"] == 4
    code, out, err = cli("eval", run, *common, "--max-new-tokens", "32")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lmforge eval: error: ")
    assert "--max-new-tokens 32 leaves no room for a prompt in this model's block_size 32" in err
