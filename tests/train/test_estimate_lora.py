"""`lmforge estimate` for fine-tuning: full, LoRA and LoRA on a low-precision base, against a
measured peak on CPU, and on a model from `lmforge import`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("torchao")

from lmforge.config import Config, load_config  # noqa: E402
from lmforge.data.loader import RandomWindows  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.model.lora import apply_lora, lower_base_precision  # noqa: E402
from lmforge.runtime import autocast  # noqa: E402
from lmforge.train.estimate import (  # noqa: E402
    count_lora,
    count_parameters,
    estimate,
    lora_memory,
    measured_saved_bytes,
    measured_step_peak,
    saved_activation_bytes,
)
from lmforge.train.optim import build_optimizers  # noqa: E402
from lmforge.train.step import Stepper, StepSettings  # noqa: E402
from tests.train.test_estimate import OPTIONS, SMALL, VARIANTS  # noqa: E402

MODEL = [
    "model.vocab_size=512",
    "model.n_layer=2",
    "model.n_head=4",
    "model.d_model=256",
    "model.block_size=64",
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "train.batch_size=4",
    "train.dtype=fp32",
    "lora.rank=8",
]


def measured_peak(config: Config) -> int:
    """Peak tensor bytes of a steady LoRA training step on CPU: the live tensors before it, plus the
    highest running sum of the profiler's allocations and frees during it (as
    benchmarks/estimate_memory.py measures full training)."""
    m, t = config.model, config.train
    torch.manual_seed(0)
    model = lower_base_precision(apply_lora(GPT(m), config.lora), config.lora.base_dtype)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, size=8 * m.block_size * t.batch_size)
    batches = RandomWindows(tokens.astype(np.uint32), m.block_size, t.batch_size, seed=0)
    optimizers = build_optimizers(model, config.optim)
    stepper = Stepper(
        model,
        optimizers,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        amp=autocast(torch.device("cpu"), t.dtype),
        device=torch.device("cpu"),
        settings=StepSettings(grad_accum_steps=1, grad_clip=config.optim.grad_clip),
    )
    model.train()
    stepper.gradients(batches)  # a first step creates AdamW's moments
    stepper.update()
    return measured_step_peak(stepper, batches)


# the adapters on every Linear of the blocks, on some (the first block then saves nothing before the first
# adapter), and with lora.dropout (a mask and a dropped copy of each adapter's input)
LORAS = {
    "all": ["lora.rank=8"],
    "proj+down": ["lora.rank=4", 'lora.targets=["proj", "down"]'],
    "up": ["lora.rank=4", 'lora.targets=["up"]'],
    "dropout": ["lora.rank=8", "lora.dropout=0.1", 'lora.targets=["proj", "up", "down"]'],
}


# the VARIANTS, and the options whose tensors LoRA changes most: proj's wider input (head_dim), the
# post-norms of branches a frozen Linear ends, and Gemma 2's and Qwen3's mixes
LORA_ARCHITECTURES = {
    **{f"variant{i}": v for i, v in enumerate(VARIANTS)},
    **{name: OPTIONS[name] for name in ("head_dim", "post_norms", "gemma2", "qwen3")},
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("overrides", LORA_ARCHITECTURES.values(), ids=LORA_ARCHITECTURES)
@pytest.mark.parametrize("lora", LORAS)
def test_lora_saved_activations_match_what_autograd_saves_to_the_byte(
    lora: str, overrides: list[str], dtype: str
) -> None:
    config = load_config(None, [*SMALL, *overrides, *LORAS[lora]])
    m = config.model
    tokens = torch.randint(0, m.vocab_size, (3, m.block_size))
    measured = measured_saved_bytes(apply_lora(GPT(m), config.lora), tokens, dtype)
    assert saved_activation_bytes(m, dtype, 3, cpu=True, lora=config.lora) == measured


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("base_dtype", ["bf16", "int8", "nf4"])
def test_a_low_precision_base_saves_the_same_activations_as_an_fp32_one(base_dtype: str, dtype: str) -> None:
    config = load_config(None, [*SMALL, *VARIANTS[2], "lora.rank=8", f"lora.base_dtype={base_dtype}"])
    m = config.model
    model = lower_base_precision(apply_lora(GPT(m), config.lora), base_dtype)
    tokens = torch.randint(0, m.vocab_size, (3, m.block_size))
    measured = measured_saved_bytes(model, tokens, dtype)  # its quantized weights are weights, not saved
    assert saved_activation_bytes(m, dtype, 3, cpu=True, lora=config.lora) == measured


def test_lora_saves_less_than_full_training_by_the_frozen_inputs_and_more_by_the_adapters() -> None:
    config = load_config(None, MODEL)  # fp32, d_model 256, 2 blocks of 4 rank-8 adapters
    m = config.model
    tokens = torch.randint(0, m.vocab_size, (4, m.block_size))
    full = measured_saved_bytes(GPT(m), tokens, "fp32")
    lora = measured_saved_bytes(apply_lora(GPT(m), config.lora), tokens, "fp32")
    # per token, not saved: the frozen head's input (fp32, 4 x 256), the first norm's input and rstd
    # (its input, the frozen embedding's output, needs no gradient) and the token ids the embedding
    # would index its gradient with (int64); saved: 8 adapters' rank-8 intermediates (fp32)
    assert full - lora == (4 * 256 + (4 * 256 + 4) + 8 - 8 * 4 * 8) * tokens.numel() == 1804 * tokens.numel()


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16", "int8", "nf4"])
def test_lora_memory_estimate_is_within_10_percent_of_the_measured_peak(base_dtype: str) -> None:
    config = load_config(None, [*MODEL, f"lora.base_dtype={base_dtype}"])
    params = count_parameters(config.model)
    estimated = lora_memory(
        config, params, count_lora(config.model, config.lora, params), base_dtype=base_dtype, cpu=True
    )
    measured = measured_peak(config)
    # estimate / measured 1.018 (fp32), 1.063 (bf16), 1.069 (int8), 0.984 (nf4): the saved activations
    # are exact; the estimate's peak is in the last block's backward (its working set is generous) and
    # adds one dequantized matrix, the measured one at the start of backward
    assert estimated.peak == pytest.approx(measured, rel=0.10), (estimated, measured)


def test_the_lower_the_base_precision_the_smaller_the_estimate_of_a_1b_model() -> None:
    # at 1B parameters the base dominates; in MODEL's 1M, nf4's dequantizing working set outweighs it
    billion = ["model.d_model=2048", "model.n_head=32", "model.n_layer=16", "model.vocab_size=32000"]
    e = estimate(load_config(None, [*MODEL, *billion]), peak_flops=1e11)
    peaks = [e.finetune[k].peak for k in ("full", "lora fp32", "lora bf16", "lora int8", "lora nf4")]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 5
    assert (
        e.finetune["lora nf4"].gradients
        == 4 * e.finetune["lora nf4"].weights * 0 + e.finetune["lora fp32"].gradients
    )  # the adapters' alone, whatever the base
    assert e.finetune_seconds["lora nf4"] < e.finetune_seconds["full"]


def test_estimate_takes_an_imported_model_folder_and_a_sequence_length(cli, tmp_path: Path) -> None:
    from tests.interop.test_hf import random_hf_model, save_hf

    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    assert cli("import", folder, "--out", tmp_path / "imported")[0] == 0
    code, out, err = cli(
        "estimate",
        tmp_path / "imported",
        "--seq-len",
        "16",
        "--set",
        "lora.rank=4",
        "--json",
        "--peak-flops",
        "1e11",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["block_size"] == 16 and result["model"]["n_kv_head"] == 2  # the imported architecture
    assert set(result["finetune"]) == {"full", "lora fp32", "lora bf16", "lora int8", "lora nf4"}
    code, out, err = cli("estimate", tmp_path / "imported", "--seq-len", "16")
    assert code == 0, err
    assert "fine-tuning, 1 device" in out and "lora nf4" in out
    code, _, err = cli("estimate", tmp_path / "imported", "--seq-len", "0")
    assert code == 1 and "--seq-len must be a positive number of tokens, got 0" in err
