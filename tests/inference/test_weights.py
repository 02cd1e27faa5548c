"""What `load` checks before it allocates: the config describes exactly the stored tensors, and asks
for bounded memory beyond them. A config.toml whose sha256 in meta.json was updated passes
verify_checkpoint: these checks are what stands between a lying config and the allocator."""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import Config, LoraConfig, ModelConfig, load_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.errors import LmforgeError
from lmforge.files import file_sha256
from lmforge.inference import load, weights
from lmforge.model import GPT
from lmforge.model.lora import apply_lora
from tests.conftest import random_char_run


def forge_config(run: Path, edit: Callable[[Config], Config]) -> Path:
    """Edit the config.toml of `run`'s checkpoint and record its new sha256 in meta.json, as someone
    crafting a checkpoint would: it still verifies. Returns the checkpoint folder."""
    path = ckpt.list_checkpoints(run)[-1].path
    config = edit(load_config(path / "config.toml"))
    (path / "config.toml").write_text(config.to_toml())
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"]["config.toml"] = file_sha256(path / "config.toml")
    (path / "meta.json").write_text(json.dumps(meta))
    ckpt.verify_checkpoint(path)
    return path


def model_change(**changes: object) -> Callable[[Config], Config]:
    return lambda config: replace(config, model=replace(config.model, **changes))


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is built anywhere but on the meta device."""
    real = weights.GPT

    def meta_only(config: ModelConfig) -> GPT:
        assert torch.get_default_device().type == "meta", f"a model was allocated: {config}"
        return real(config)

    monkeypatch.setattr(weights, "GPT", meta_only)


def test_a_config_that_would_allocate_13_tb_is_a_one_line_error_before_any_allocation(
    cli, tmp_path: Path, no_allocation: None
) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=2, d_model=32, block_size=16)
    path = forge_config(run, model_change(d_model=1048576, n_layer=4096))
    code, out, err = cli("sample", run, "--checkpoint", "last", "--device", "cpu", "--max-new-tokens", "2")
    vocab = load_config(path / "config.toml").model.vocab_size
    assert (code, out) == (1, "") and "Traceback" not in err
    assert err == (
        f"lmforge sample: error: {path}: config.toml does not fit model.safetensors: "
        f"embed.weight is [{vocab}, 1048576] by the config but [{vocab}, 32] stored\n"
    )


def test_a_config_one_layer_deeper_than_the_weights_names_the_first_missing_tensor(
    tmp_path: Path, no_allocation: None
) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=2, d_model=32, block_size=16)
    path = forge_config(run, model_change(n_layer=3))
    with pytest.raises(LmforgeError) as error:
        load(run, "last", "cpu", dtype="fp32")
    assert str(error.value) == (
        f"{path}: config.toml does not fit model.safetensors: blocks.2.norm1.weight [32] by the config "
        "is not stored"
    )


def test_a_config_one_layer_shallower_than_the_weights_names_a_tensor_it_has_no_place_for(
    cli, tmp_path: Path, no_allocation: None
) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=2, d_model=32, block_size=16)
    path = forge_config(run, model_change(n_layer=1))
    code, _, err = cli("eval", run, "--checkpoint", "last", "--device", "cpu", "--data", tmp_path)
    assert code == 1 and err.count("\n") == 1, err
    misfit = f"lmforge eval: error: {path}: config.toml does not fit model.safetensors"
    assert err.startswith(f"{misfit}: blocks.1."), err
    assert err.endswith("is stored but not in the model the config describes (12 such tensors)\n")


def test_without_weights_the_config_is_checked_as_well(tmp_path: Path, no_allocation: None) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=2, d_model=32, block_size=16)
    forge_config(run, model_change(d_model=64, n_head=4))
    shapes = r"embed.weight is \[\d+, 64\] by the config but \[\d+, 32\] stored"
    with pytest.raises(LmforgeError, match=shapes):
        load(run, "last", "cpu", dtype="fp32", weights=False)


def rope_run(run: Path, d_model: int) -> Path:
    """A one-layer RoPE model: its config's block_size and n_head shape none of its weights."""
    tokenizer = char_tokenizer("ab")
    tokenizer.save(str(run.parent / "tokenizer.json"))
    m = ModelConfig(n_layer=1, n_head=4, d_model=d_model, block_size=16, position="rope", vocab_size=2)
    torch.manual_seed(0)
    ckpt.save_checkpoint(
        run,
        1,
        GPT(m),
        state={},
        config=Config(model=m),
        tokenizer_file=run.parent / "tokenizer.json",
        val_loss=None,
    )
    return run


def test_the_rope_tables_a_config_asks_for_are_bounded_by_the_weights_or_1_gib(
    tmp_path: Path, no_allocation: None
) -> None:
    # block_size 2**20 and one head of 256 channels: cos and sin of 2**20 x 256 fp32 values, 2 GiB
    run = rope_run(tmp_path / "run", d_model=256)
    path = forge_config(run, model_change(block_size=1 << 20, n_head=1))
    with pytest.raises(LmforgeError) as error:
        load(run, "last", "cpu", dtype="fp32")
    assert str(error.value) == (
        f"{path}: config.toml asks for 2.0 GiB beyond the stored weights (rotary.cos is [1048576, 256]), "
        "more than the 1.0 GiB allowed (the size of model.safetensors, or 1 GiB if that is less)"
    )


def test_a_lora_checkpoint_is_checked_with_its_adapters_and_loads_merged(tmp_path: Path) -> None:
    tokenizer = char_tokenizer("ab")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    m = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=2)
    config = Config(model=m, lora=LoraConfig(rank=4))
    adapted = apply_lora(GPT(m), config.lora)
    ckpt.save_checkpoint(
        tmp_path / "run",
        1,
        adapted,
        state={},
        config=config,
        tokenizer_file=tmp_path / "tokenizer.json",
        val_loss=None,
    )
    assert type(load(tmp_path / "run", "last", "cpu", dtype="fp32").model) is GPT
    path = forge_config(tmp_path / "run", lambda c: replace(c, lora=replace(c.lora, rank=8)))
    with pytest.raises(LmforgeError) as error:
        load(tmp_path / "run", "last", "cpu", dtype="fp32")
    misfit = f"{path}: config.toml does not fit model.safetensors"
    assert str(error.value).startswith(f"{misfit}: base_model.model."), error.value
    assert "lora_A.default.weight is [8, 16] by the config but [4, 16] stored" in str(error.value)


def test_unreadable_weights_with_an_updated_sha256_are_a_one_line_error(tmp_path: Path) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    path = ckpt.list_checkpoints(run)[-1].path
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"]["model.safetensors"] = file_sha256(path / "model.safetensors")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LmforgeError, match=r"model.safetensors cannot be read \(.*header too large"):
        load(run, "last", "cpu", dtype="fp32")
