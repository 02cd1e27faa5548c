"""The base-model recipes (base-gutenberg*): what they promise about their shape, and
that the GPU recipe trains as written, at toy size, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.interop.hf import hf_family
from lmforge.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR


@pytest.mark.parametrize("name", ["base-gutenberg.toml", "base-gutenberg-gpu.toml"])
def test_base_recipes_are_llamas_with_a_wsd_schedule(name: str) -> None:
    config = load_config(CONFIGS / name)
    m = config.model
    assert hf_family(m) == "llama"  # what `lmforge export` writes for it
    assert (m.position, m.norm, m.mlp, m.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert config.schedule.name == "wsd" and config.data.dir == "out/data/gutenberg-bpe"


def test_the_gpu_recipe_is_gpt2_small_sized_in_bf16_with_compile() -> None:
    config = load_config(CONFIGS / "base-gutenberg-gpu.toml")
    m, t = config.model, config.train
    assert (m.n_layer, m.d_model, m.n_head, m.block_size) == (12, 768, 12, 1024)
    assert (t.dtype, t.compile) == ("bf16", True)


def test_the_gpu_recipe_trains_at_toy_size_on_cpu(cli, tiny_gutenberg, tmp_path: Path) -> None:
    code, _, err = cli("prepare", "gutenberg", "--tokenizer", "bpe", "--vocab-size", "320",
                       "--out", tmp_path / "data", "-q")  # fmt: skip
    assert code == 0, err
    # Only sizes, steps and the device change; bf16 autocast stays (emulated on an AVX2-only CPU, cheap
    # at this size), compile is off (on CPU it needs a C++ compiler and half a minute).
    smaller = [f"data.dir={tmp_path / 'data'}", "model.n_layer=2", "model.n_head=2", "model.d_model=32",
               "model.block_size=64", "train.batch_size=4", "train.max_steps=3", "train.eval_interval=0",
               "train.checkpoint_interval=0", "train.device=cpu", "train.compile=false", "log.progress=false",
               "schedule.warmup_steps=1"]  # fmt: skip
    code, out, err = cli("train", CONFIGS / "base-gutenberg-gpu.toml", "--out", tmp_path / "run",
                         *[a for s in smaller for a in ("--set", s)])  # fmt: skip
    assert code == 0, err
    assert "training on cpu in bf16" in err + out
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.schedule.name, saved.model.mlp, saved.train.dtype) == ("wsd", "swiglu", "bf16")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "val_loss" in e] == [3]


def test_a_wsd_base_run_continues_with_more_steps(cli, char_data: Path, tmp_path: Path) -> None:
    """`train --resume --set train.max_steps=N` extends a finished WSD run: the schedule is recomputed
    for N steps, so the lr is back at its stable value (the decay moves to the new end)."""
    toy = [f"data.dir={char_data}", "model.n_layer=1", "model.n_head=2", "model.d_model=16",
           "model.block_size=32", "train.batch_size=2", "train.eval_interval=0",
           "train.checkpoint_interval=0", "train.device=cpu", "schedule.warmup_steps=1",
           "log.progress=false"]  # fmt: skip
    args = [a for s in toy for a in ("--set", s)]
    code, _, err = cli("train", CONFIGS / "base-gutenberg.toml", "--out", tmp_path / "run", *args,
                       "--set", "train.max_steps=10")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("train", "--resume", "--out", tmp_path / "run", *args, "--set", "train.max_steps=20")
    assert code == 0, err
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {s["step"]: s["lr"] for s in steps if "lr" in s}
    peak = load_config(CONFIGS / "base-gutenberg.toml").optim.lr
    assert lr[10] < peak and lr[11] == pytest.approx(peak) and lr[20] < peak  # decayed, stable, decayed
    assert sorted(lr) == list(range(1, 21))
