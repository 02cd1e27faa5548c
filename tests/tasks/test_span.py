"""A span head (model.head = "span"): fine-tuned on prompt/completion data whose completion is in the
prompt, it learns to point at the answer, and `lmforge eval --task` answers with that span."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.errors import LmforgeError
from tests.conftest import PIN_FP32, TINY
from tests.tasks.conftest import lines

WORDS = ["cat", "dog", "owl", "elk", "ant", "bee", "cow", "fox", "yak", "emu", "hen", "ram"]


def keyed_record(rng: random.Random, i: int, n_words: int = 6) -> dict:
    """`n_words` words with "=" before one of them: the answer is the word after "="."""
    words = rng.sample(WORDS, n_words)
    at = rng.randrange(n_words)
    context = " ".join(words[:at] + ["=", *words[at:]])
    prompt = f"Question: which word follows =?\nContext: {context}\nAnswer:"
    return {"prompt": prompt, "completion": f" {words[at]}", "answers": [words[at]], "id": f"k{i}"}


def write_keyed_task(folder: Path, word_counts: tuple[int, ...] = (6,), train_size: int = 400) -> Path:
    """Train, val and eval splits of keyed records whose contexts take turns at `word_counts` words,
    and a character tokenizer."""
    return write_task(
        folder, lambda rng, i: keyed_record(rng, i, word_counts[i % len(word_counts)]), train_size
    )


def write_task(folder: Path, record: Callable[[random.Random, int], dict], train_size: int = 400) -> Path:
    """Train, val and eval splits of `record(rng, i)`, and a character tokenizer."""
    rng = random.Random(0)
    folder.mkdir()
    for split, n in (("train", train_size), ("val", 40), ("eval", 40)):
        records = [record(rng, i) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = "".join(r["prompt"] for r in lines(folder / "train.jsonl")) + " ".join(WORDS)
    char_tokenizer(text, specials=[EOT]).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def keyed_task(tmp_path: Path) -> Path:
    return write_keyed_task(tmp_path / "keyed")


def span_run(data: Path, *extra: str) -> list[str]:
    chosen = [*TINY, "model.head=span", "model.block_size=96", "model.position=rope",
              "train.batch_size=16", "train.max_steps=90", "train.eval_interval=45",
              "train.checkpoint_interval=0", *extra]  # fmt: skip
    sets = [arg for item in chosen for arg in ("--set", item)]
    return [*sets, "--set", f"data.dir={data}", "--set", f"data.tokenizer={data / 'tokenizer.json'}"]


@pytest.mark.slow
def test_a_span_model_learns_to_point_at_the_answer(cli, keyed_task: Path, tmp_path: Path) -> None:
    # fp32: the val loss bound below was set in fp32 (bf16 training ends at 0.53 after these steps)
    code, _, err = cli("finetune", "--out", tmp_path / "run", *span_run(keyed_task, PIN_FP32))
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "run", "--task", "squad", "--json",
                         "--predictions", tmp_path / "predictions.jsonl")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["decoding"].startswith("extractive")
    assert result["model"]["exact_match"] >= 90 and result["baseline"]["exact_match"] == 0
    written = lines(tmp_path / "predictions.jsonl")
    assert all(w["prediction"] and w["prediction"] in w["prompt"] for w in written)
    code, out, err = cli("eval", tmp_path / "run", "--json")  # the span loss on val.jsonl
    assert code == 0, err
    assert json.loads(out)["tokens"] == 40  # one score per example
    assert json.loads(out)["val_loss"] < 0.5


def follower_record(rng: random.Random, i: int) -> dict:
    """Six words, and a question naming one of the first five: the answer is the word after it."""
    words = rng.sample(WORDS, 6)
    at = rng.randrange(5)
    prompt = f"Question: which word follows {words[at]}?\nContext: {' '.join(words)}\nAnswer:"
    return {"prompt": prompt, "completion": f" {words[at + 1]}", "answers": [words[at + 1]], "id": f"f{i}"}


@pytest.mark.slow
def test_the_word_match_input_shows_a_span_model_the_words_the_question_names(cli, tmp_path: Path) -> None:
    """Found only by matching the question's word in the context: marked for the model (training
    and `lmforge eval`), it is a matter of pointing one word further."""
    data = write_task(tmp_path / "follower", follower_record)
    # fp32: the 90% bound was set in fp32; bf16 training reached 77.5-87.5% here (emulated bf16, a
    # no-native-bf16 Xeon under LMFORGE_NATIVE_BF16=1), the kernels' rounding deciding a few answers
    settings = span_run(data, "model.word_match=true", PIN_FP32)
    code, _, err = cli("finetune", "--out", tmp_path / "run", *settings)
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "run", "--task", "squad", "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["exact_match"] >= 90


def test_a_language_model_fine_tunes_into_a_span_model_which_generates_nothing(
    cli, keyed_task: Path, tmp_path: Path
) -> None:
    settings = [arg for item in [*TINY, "model.block_size=96", "train.max_steps=2", "train.eval_interval=0",
                                 "train.checkpoint_interval=0"] for arg in ("--set", item)]  # fmt: skip
    data = ["--set", f"data.dir={keyed_task}", "--set", f"data.tokenizer={keyed_task / 'tokenizer.json'}"]
    code, _, err = cli("finetune", "--out", tmp_path / "lm", *settings, *data)
    assert code == 0, err
    code, _, err = cli("finetune", "--out", tmp_path / "span", *settings, "--set", "model.head=span",
                       "--set", "model.attention=bidirectional",  # the run's own, as the head
                       "--set", f"train.init_from={tmp_path / 'lm'}", "--set", "optim.lr=1e-30",
                       "--set", "schedule.min_lr=0", "--set", f"data.dir={keyed_task}")  # fmt: skip
    assert code == 0, err
    assert 'attention = "bidirectional"' in (tmp_path / "span" / "config.toml").read_text()
    lm, span = (load_file(next((tmp_path / r / "checkpoints").glob("step-*")) / "model.safetensors")
                for r in ("lm", "span"))  # fmt: skip
    assert set(span) - set(lm) == {"span_head.weight", "span_head.bias"}
    assert all((span[k] == v).all() for k, v in lm.items())  # the blocks start from the language model
    for verb in (["sample"], ["eval", "--task", "sst2"], ["export", "--out", str(tmp_path / "hf")]):
        code, _, err = cli(verb[0], tmp_path / "span", *verb[1:])
        assert code != 0 and len(err.strip().splitlines()) == 1 and "span" in err, (verb, err)
    code, _, err = cli("finetune", "--out", tmp_path / "lm2", *settings, *data,
                       "--set", f"train.init_from={tmp_path / 'span'}")  # fmt: skip
    assert code == 0, err  # and back: the span head is left behind


@pytest.mark.parametrize(
    "setting, message",
    [("data.kind=tokens", 'data.kind must be "sft" with model.head = "span"'),
     ("lora.rank=4", 'lora.rank must be 0 with model.head = "span"'),
     ("model.head=lm", 'model.attention must be "causal" unless model.head = "span"')],
)  # fmt: skip
def test_a_span_head_needs_fine_tuning_data_and_full_training(setting: str, message: str) -> None:
    with pytest.raises(LmforgeError, match=re.escape(message)):
        load_config(None, ["model.head=span", "model.attention=bidirectional", "data.kind=sft", setting])


def test_the_word_match_input_needs_a_span_head() -> None:
    with pytest.raises(LmforgeError, match=re.escape('model.word_match needs model.head = "span"')):
        load_config(None, ["model.word_match=true"])


@pytest.mark.parametrize("head", ["lm", "span"])
def test_a_span_loss_is_weighed_per_row_across_ranks(keyed_task: Path, tmp_path: Path, head: str) -> None:
    """The trainer is told, from the config, that a span loss is a mean over rows (see
    `Distributed.shard`): the model it steps may be a DDP wrapper that has no span head to look at."""
    import torch

    from lmforge.train.distributed import Distributed
    from lmforge.train.run import build_run

    settings = [*TINY, f"model.head={head}", "model.block_size=96", "data.kind=sft", f"data.dir={keyed_task}",
                f"data.tokenizer={keyed_task / 'tokenizer.json'}"]  # fmt: skip
    config = load_config(None, settings)
    run = build_run(config, tmp_path / "run", dist=Distributed(), device=torch.device("cpu"))
    assert run.stepper.settings.loss_per_row == (head == "span")


@pytest.mark.slow
def test_two_processes_train_a_span_model_as_one(cli, tmp_path: Path) -> None:
    """DDP over 2 processes: each rank's rows weigh alike in the span loss (a per-row mean), so the
    losses match one process's. The training set is one batch of 2-word and 12-word contexts, which
    the length-sorted batch splits between the ranks: weighed by tokens, the ranks would differ."""
    from tests.train.test_distributed import assert_same_losses, torchrun

    data = write_keyed_task(tmp_path / "uneven", word_counts=(2, 12), train_size=16)
    settings = span_run(
        data, "model.attention=bidirectional", "train.max_steps=8", "train.eval_interval=4", PIN_FP32
    )
    code, _, err = cli("finetune", "--out", tmp_path / "one", *settings)
    assert code == 0, err
    result = torchrun("finetune", "--out", tmp_path / "two", *settings, "--set", "parallel.strategy=ddp")
    assert result.returncode == 0, result.stderr
    assert_same_losses(tmp_path / "two", tmp_path / "one")  # losses and gradient norms, steps 1-8
