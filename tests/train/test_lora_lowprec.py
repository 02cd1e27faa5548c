"""LoRA on a low-precision frozen base (`lora.base_dtype`): trains, resumes exactly, merges for use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("torchao")

from lmforge import checkpoint as ckpt  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.model.lora import FrozenLinear, apply_lora, lower_base_precision  # noqa: E402
from tests.conftest import PIN_FP32, TINY  # noqa: E402
from tests.train.test_finetune import assert_same_steps, copy_up_to  # noqa: E402


def lora_args(data: Path, out: Path, base_dtype: str, *extra: str) -> list[str]:
    settings = [
        *TINY,
        PIN_FP32,
        "model.d_model=64",
        "train.max_steps=10",
        "train.eval_interval=5",
        "train.checkpoint_interval=5",
        "lora.rank=4",
        "lora.dropout=0.1",
        f"lora.base_dtype={base_dtype}",
        *extra,
    ]
    return ["train", "--out", out, "--set", f"data.dir={data}", *sum((["--set", s] for s in settings), [])]


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_low_precision_lora_resumes_with_the_losses_of_an_uninterrupted_run(
    cli, char_data: Path, tmp_path: Path, base_dtype: str
) -> None:
    code, _, err = cli(*lora_args(char_data, tmp_path / "run", base_dtype))
    assert code == 0, err
    resumed = copy_up_to(tmp_path / "run", tmp_path / "resumed", 5)
    code, _, err = cli(*lora_args(char_data, resumed, base_dtype), "--resume")
    assert code == 0, err
    assert_same_steps(resumed, tmp_path / "run")


@pytest.mark.parametrize("base_dtype", ["bf16", "int8", "nf4"])
def test_checkpoint_holds_the_dequantized_base_and_loads_merged_with_the_trained_function(
    cli, char_data: Path, tmp_path: Path, base_dtype: str
) -> None:
    code, _, err = cli(*lora_args(char_data, tmp_path / "run", base_dtype, "train.max_steps=5"))
    assert code == 0, err
    path = ckpt.list_checkpoints(tmp_path / "run")[-1].path
    config = load_config(tmp_path / "run" / "config.toml")
    # the run's own model: its seeded base quantized as training did, its adapters loaded
    torch.manual_seed(config.train.seed)
    trained = lower_base_precision(apply_lora(GPT(config.model), config.lora), base_dtype)
    ckpt.load_weights(path, trained)  # checks that the stored base is this quantized base, dequantized
    frozen = [m for m in trained.modules() if isinstance(m, FrozenLinear)]
    assert len(frozen) == 2 * 4
    merged = load(tmp_path / "run", "last", "cpu").model
    assert type(merged).__name__ == "GPT"
    idx = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # fp32: merging adds B @ A * scale to the dequantized base, a rounding apart
        torch.testing.assert_close(merged(idx)[0], trained.eval()(idx)[0], rtol=1e-5, atol=1e-5)


def test_low_precision_lora_from_train_init_from_resumes_exactly(
    cli, char_data: Path, tmp_path: Path
) -> None:
    """QLoRA's usual case, a pretrained base: the resume quantizes train.init_from's weights again (it
    quantized the seeded random ones, which are not the stored base, and refused every resume)."""
    base = ["train.max_steps=2", "train.checkpoint_interval=2", "train.eval_interval=2"]
    code, _, err = cli(*lora_args(char_data, tmp_path / "base", "fp32", *base, "lora.rank=0"))
    assert code == 0, err
    tuned = ["train.max_steps=4", "train.checkpoint_interval=2", "train.eval_interval=2"]
    tuned.append(f"train.init_from={tmp_path / 'base'}")
    code, _, err = cli(*lora_args(char_data, tmp_path / "run", "int8", *tuned))
    assert code == 0, err
    resumed = copy_up_to(tmp_path / "run", tmp_path / "resumed", 2)
    code, _, err = cli(*lora_args(char_data, resumed, "int8", *tuned), "--resume")
    assert code == 0, err
    assert_same_steps(resumed, tmp_path / "run")
