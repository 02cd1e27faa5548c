"""The whole transfer chain at toy size, so that the recipes cannot rot: prepare gutenberg (a 5-book
slice), pretrain a few steps, fine-tune from that checkpoint with its tokenizer, evaluate with
predictions on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, use_gutenberg
from tests.tasks.conftest import CLOZE_BOOK, lines

QUESTIONS = [
    ("It was a dark and stormy night.", "What was the night?", "dark and stormy"),
    ("Call me Ishmael.", "Who speaks?", "Ishmael"),
    ("Emma was rich and clever.", "Who was rich?", "Emma"),
    ("The rain fell in torrents.", "What fell?", "The rain"),
]


def write_task(folder: Path) -> None:
    """A SQuAD-style task folder: train, val (checkpoint selection) and eval (scored) files."""
    folder.mkdir()
    records = [
        {
            "prompt": f"Context: {c}\nQuestion: {q}\nAnswer:",
            "completion": f" {a}",
            "answers": [a],
            "id": f"q{i}",
        }
        for i, (c, q, a) in enumerate(QUESTIONS)
    ]
    for split, chosen in (("train", records * 4), ("val", records[:2]), ("eval", records[2:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))


def settings() -> list[str]:
    """TINY, cut to 4 steps with an eval every 2."""
    chosen = [
        *TINY,
        "model.block_size=64",
        "train.max_steps=4",
        "train.eval_interval=2",
        "train.checkpoint_interval=0",
    ]
    return [arg for item in chosen for arg in ("--set", item)]


def test_prepare_pretrain_finetune_and_eval_chain(cli, tiny_gutenberg, tmp_path: Path) -> None:
    code, _, err = cli("prepare", "gutenberg", "--tokenizer", "bpe", "--vocab-size", "320",
                       "--out", tmp_path / "data", "-q")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("train", "--out", tmp_path / "base", "--set", f"data.dir={tmp_path / 'data'}",
                       *settings())  # fmt: skip
    assert code == 0, err
    write_task(tmp_path / "task")
    code, _, err = cli("finetune", "--out", tmp_path / "tuned", "--set", f"data.dir={tmp_path / 'task'}",
                       "--set", f"train.init_from={tmp_path / 'base'}",
                       *settings())  # fmt: skip
    assert code == 0, err
    tuned_tokenizer = (tmp_path / "tuned" / "checkpoints").glob("step-*/tokenizer.json")
    assert {p.read_bytes() for p in tuned_tokenizer} == {(tmp_path / "data" / "tokenizer.json").read_bytes()}
    evals = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "val_loss" in e] == [2, 4]  # selection on val.jsonl
    code, out, err = cli("eval", tmp_path / "tuned", "--task", "squad", "--json", "--max-new-tokens", "4",
                         "--predictions", tmp_path / "predictions.jsonl")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["data"].endswith("eval.jsonl") and result["examples"] == 2
    written = lines(tmp_path / "predictions.jsonl")
    assert [w["id"] for w in written] == ["q2", "q3"]
    assert all(set(w) == {"id", "prompt", "references", "prediction", "score"} for w in written)
    assert sum(w["score"]["f1"] for w in written) / 2 == result["model"]["f1"]


def smaller(*settings: str) -> list[str]:
    """A recipe at toy size: 2 layers of width 32, 2 steps of 4 sequences, on CPU."""
    chosen = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "train.batch_size=4",
              "train.max_steps=2", "train.eval_interval=0", "train.checkpoint_interval=0", "train.device=cpu",
              "schedule.warmup_steps=1", "log.progress=false", *settings]  # fmt: skip
    return [arg for item in chosen for arg in ("--set", item)]


def test_base_recipe_then_cloze_then_the_squad_recipe_from_the_base(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Recipe base-gutenberg pretrains, `tasks prepare cloze` makes questions from the same corpus,
    recipe tasks/squad fine-tunes the base on them (its architecture comes from the base)."""
    use_gutenberg(monkeypatch, tmp_path / "shared", {"train": [CLOZE_BOOK] * 3, "val": [CLOZE_BOOK]})
    code, _, err = cli("prepare", "gutenberg", "--tokenizer", "bpe", "--vocab-size", "300",
                       "--out", tmp_path / "data", "-q")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("train", "base-gutenberg", "--out", tmp_path / "base",
                       *smaller(f"data.dir={tmp_path / 'data'}", "model.block_size=128"))  # fmt: skip
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "base", "--json")
    assert code == 0, err
    assert json.loads(out)["data"] == str(tmp_path / "data") and json.loads(out)["bpb"] > 0  # Gutenberg valid

    code, _, err = cli("tasks", "prepare", "cloze", "--from", "gutenberg", "--out", tmp_path / "cloze")
    assert code == 0, err
    from_base = smaller(f"data.dir={tmp_path / 'cloze'}", f"train.init_from={tmp_path / 'base'}")
    code, _, err = cli("finetune", "tasks/squad", "--out", tmp_path / "tuned", *from_base)
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "tuned", "--task", "cloze", "--json", "--max-new-tokens", "4")
    assert code == 0, err
    assert json.loads(out)["examples"] == len(lines(tmp_path / "cloze" / "eval.jsonl"))
    # recipe tasks/squad-span: the same questions answered by a span head on the base
    code, _, err = cli("finetune", "tasks/squad-span", "--out", tmp_path / "span", *from_base)
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "span", "--task", "cloze", "--json", "--max-new-tokens", "4")
    assert code == 0, err
    assert json.loads(out)["decoding"].startswith("extractive")
    code, _, err = cli("export", tmp_path / "base", "--out", tmp_path / "hf")
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
