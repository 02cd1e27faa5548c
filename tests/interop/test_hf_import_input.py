"""`lmforge import` of hostile or malformed folders: files confined to the folder, config.json typed
strictly and validated like a TOML config, RoPE parameters read where transformers 5 writes them.

The folders are written with lmforge's own export functions, so these tests need no transformers.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import byte_tokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import hf_config, model_config_from_hf, read_hf_weights, save_shards, to_hf
from lmforge.model import GPT

LLAMA = ModelConfig(
    n_layer=2, n_head=2, d_model=16, block_size=16, vocab_size=256, position="rope", norm="rmsnorm",
    mlp="swiglu", bias=False,
)  # fmt: skip


def hf_folder(folder: Path, sharded: bool = False) -> Path:
    """A Llama folder as `lmforge export` writes it: config.json, weights, tokenizer.json."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in GPT(LLAMA).state_dict().items()}
    save_shards(to_hf(state, LLAMA, "llama"), folder, 4_000 if sharded else 10**9)
    (folder / "config.json").write_text(json.dumps(hf_config(LLAMA, "llama", None, dtype="float32")))
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def shards(folder: Path) -> list[Path]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return [folder / name for name in sorted(set(weight_map.values()))]


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def assert_one_line_error(cli, folder: Path, out: Path, *parts: str) -> None:
    code, _, err = cli("import", folder, "--out", out)
    assert code == 1 and err.count("\n") == 1 and err.startswith("lmforge import: error: "), err
    for part in parts:
        assert part in err, err
    assert not out.exists()


def test_a_sharded_folder_imports(cli, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf", sharded=True)
    assert len(shards(folder)) > 1
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 0, err


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_folder_are_refused(cli, tmp_path: Path, name: str) -> None:
    folder = hf_folder(tmp_path / "hf", sharded=True)
    shards(folder)[0].rename(tmp_path / "outside.safetensors")
    (folder / "sub").mkdir()
    index = folder / "model.safetensors.index.json"
    edit_json(index, lambda i: i["weight_map"].update(dict.fromkeys(i["weight_map"], name)))
    assert_one_line_error(cli, folder, tmp_path / "run", "outside", "model.safetensors.index.json")


def test_a_shard_that_links_outside_the_folder_is_refused(cli, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf", sharded=True)
    shard = shards(folder)[0]
    shard.rename(tmp_path / "outside.safetensors")
    shard.symlink_to(tmp_path / "outside.safetensors")
    assert_one_line_error(cli, folder, tmp_path / "run", shard.name, "outside")


def test_a_single_weights_file_that_links_outside_is_refused(cli, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert_one_line_error(cli, folder, tmp_path / "run", "model.safetensors", "outside")


def test_a_fifo_among_the_shards_is_refused_without_hanging(cli, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf", sharded=True)
    shard = shards(folder)[-1]
    shard.unlink()
    os.mkfifo(shard)
    signal.alarm(20)  # a regression would block in open(); fail the test rather than hang the suite
    try:
        assert_one_line_error(cli, folder, tmp_path / "run", "not a regular file")
    finally:
        signal.alarm(0)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("[1, 2]", "expected an object with a 'weight_map' object"),
        ('{"weight_map": {"a": 5}}', "weight_map values must be file names"),
        ('{"weight_map": []}', "expected an object with a 'weight_map' object"),
        ("[" * 100_000, "not valid JSON (JSON nested too deeply)"),
        ("{oops", "not valid JSON"),
    ],
)
def test_a_malformed_index_is_a_one_line_error(cli, tmp_path: Path, index: str, message: str) -> None:
    folder = hf_folder(tmp_path / "hf", sharded=True)
    (folder / "model.safetensors.index.json").write_text(index)
    assert_one_line_error(cli, folder, tmp_path / "run", "model.safetensors.index.json", message)


def test_read_hf_weights_reads_only_regular_files_in_the_folder(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf")
    assert "model.embed_tokens.weight" in read_hf_weights(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    with pytest.raises(LmforgeError, match="model.safetensors: not a regular file"):
        read_hf_weights(folder)


def llama_config(**changes: object) -> dict:
    config = hf_config(LLAMA, "llama", None, dtype="float32")
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([1, 2, 3], "config.json: expected a JSON object"),
        (llama_config(num_attention_heads=0), "num_attention_heads must be an integer >= 1; got 0"),
        (llama_config(num_attention_heads=-2), "num_attention_heads must be an integer >= 1; got -2"),
        (llama_config(hidden_size=None), "config.json: missing key hidden_size"),
        (llama_config(num_hidden_layers="2"), "num_hidden_layers must be an integer >= 1; got '2'"),
        (llama_config(num_hidden_layers=2.0), "num_hidden_layers must be an integer >= 1; got 2.0"),
        (llama_config(num_hidden_layers=True), "num_hidden_layers must be an integer >= 1; got True"),
        (llama_config(vocab_size=2**30), "model.vocab_size must be at most 16,777,216"),
        (llama_config(tie_word_embeddings="false"), "tie_word_embeddings must be true or false; got 'false'"),
        (llama_config(rms_norm_eps="1e-6"), "rms_norm_eps must be a finite number > 0; got '1e-6'"),
        (llama_config(rms_norm_eps=math.nan), "rms_norm_eps must be a finite number > 0; got nan"),
        (llama_config(rms_norm_eps=0), "rms_norm_eps must be a finite number > 0; got 0"),
        (llama_config(hidden_act=["silu"]), "hidden_act ['silu'] is not supported"),
        (llama_config(rope_theta=math.inf), "rope_theta must be a finite number > 0; got inf"),
        (llama_config(head_dim=5), "model.head_dim must be even for rope"),
        (llama_config(num_key_value_heads=3, head_dim=None), "model.n_head (2) must be divisible by"),
        (llama_config(sliding_window="big", use_sliding_window=True), "sliding_window must be an integer"),
        (
            llama_config(layer_types=["full_attention", "sliding_attention"]),
            "mixes attention kinds across layers",
        ),
        ({"model_type": ["llama"]}, "model_type ['llama'] is not supported"),
        (
            {
                "model_type": "gpt2",
                "n_embd": 30,
                "n_layer": 1,
                "n_head": 4,
                "n_positions": 8,
                "vocab_size": 9,
            },
            "model.d_model (30) must be divisible by model.n_head (4)",
        ),
        (
            {
                "model_type": "gpt2",
                "n_embd": 8,
                "n_layer": 1,
                "n_head": 2,
                "n_positions": 8,
                "vocab_size": 9,
                "n_inner": 0,
            },
            "n_inner must be an integer >= 1; got 0",
        ),  # fmt: skip
    ],
)
def test_config_json_of_the_wrong_shape_is_a_one_line_error(config: object, message: str) -> None:
    with pytest.raises(LmforgeError) as info:
        model_config_from_hf(config, "hf/config.json")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("hf/config.json: ")


def test_rope_theta_is_read_from_transformers_5_rope_parameters() -> None:
    config = llama_config(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert model_config_from_hf(config, "config.json").rope_theta == 500000.0
    legacy = llama_config(rope_theta=250000.0)
    assert model_config_from_hf(legacy, "config.json").rope_theta == 250000.0
    both = llama_config(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000})
    assert model_config_from_hf(both, "config.json").rope_theta == 500000.0


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}, "missing key low_freq_factor"),
        ({"rope_type": "yarn", "rope_theta": 10000.0}, "rope type 'yarn' is not supported"),
        ({"rope_type": "longrope", "factor": 2.0}, "rope type 'longrope' is not supported"),
        ({"type": "su", "factor": 2.0}, "rope type 'su' is not supported"),
        ({"rope_type": "linear", "factor": 2.0, "attention_factor": 1.0}, "rope_parameters.attention_factor"),
        ({"rope_type": "dynamic", "factor": 0.5}, "model.rope_factor must be at least 1"),
        ({"rope_type": "default", "rope_theta": "5e5"}, "rope_parameters.rope_theta must be a finite number"),
        ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"full_attention": {"rope_type": "default"}}, "rope_parameters.full_attention is not supported"),
        ("default", "rope_parameters must be an object"),
    ],
)
def test_rope_parameters_lmforge_does_not_compute_exactly_are_refused_by_name(
    rope: object, message: str
) -> None:
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        model_config_from_hf(llama_config(rope_theta=None, rope_parameters=rope), "config.json")


def test_two_different_rope_thetas_are_refused() -> None:
    config = llama_config(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    with pytest.raises(
        LmforgeError, match="rope_parameters.rope_theta 500000.0 disagrees with rope_theta 10000.0"
    ):
        model_config_from_hf(config, "config.json")


def test_an_imported_model_keeps_the_rope_theta_of_rope_parameters(cli, tmp_path: Path) -> None:
    from lmforge.inference import load

    folder = hf_folder(tmp_path / "hf")
    edit_json(
        folder / "config.json",
        lambda c: (
            c.pop("rope_theta"),
            c.update(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        ),
    )
    assert cli("import", folder, "--out", tmp_path / "run")[0] == 0
    loaded = load(tmp_path / "run", "last", "cpu")
    assert loaded.config.model.rope_theta == 500000.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"model_type": "llama", "vocab_size": ' + "1" * 5000 + "}", "JSON number has too many digits"),
        ("[" * 100_000, "JSON nested too deeply"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_unreadable_config_json_is_a_one_line_error(cli, tmp_path: Path, text: str, message: str) -> None:
    folder = hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text(text)
    assert_one_line_error(cli, folder, tmp_path / "run", "config.json", message)


def test_tensors_of_the_wrong_shape_are_a_one_line_error(cli, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = hf_folder(tmp_path / "hf")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 5)
    save_file(tensors, folder / "model.safetensors")
    assert_one_line_error(cli, folder, tmp_path / "run", "tensors do not fit config.json")


def test_a_transformers_5_model_with_another_rope_theta_imports_with_equal_logits(
    cli, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    from lmforge.inference import load

    config = transformers.LlamaConfig(
        vocab_size=256, num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48,
        max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    assert "rope_theta" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "run")[0] == 0
    ours = load(tmp_path / "run", "last", "cpu").model
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
