"""Export to and import from Hugging Face folders, checked against transformers itself."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import checkpoint as ckpt  # noqa: E402
from lmforge.config import Config, ModelConfig, load_config  # noqa: E402
from lmforge.data.chat_template import ChatTemplate  # noqa: E402
from lmforge.data.tokenizer import byte_tokenizer, char_tokenizer, train_bpe  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.files import file_sha256  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.inference.generate import generate  # noqa: E402
from lmforge.interop.hf import export_checkpoint, import_folder  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.recipes import recipe  # noqa: E402
from tests.conftest import TINY, snapshot  # noqa: E402

CPU = torch.device("cpu")
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"


def lmforge_run(root: Path, tokenizer, **options) -> Path:
    """A run folder with one checkpoint of a randomly initialised (and perturbed) model."""
    tokenizer.save(str(root / "tokenizer.json"))
    vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    m = ModelConfig(
        **({"n_layer": 2, "n_head": 4, "d_model": 32, "block_size": 32, "vocab_size": vocab} | options)
    )
    torch.manual_seed(0)
    model = GPT(m)
    with torch.no_grad():  # move norms off 1 and biases off 0 so a wrong mapping shows
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    run = root / "run"
    ckpt.save_checkpoint(
        run, 7, model, state={}, config=Config(model=m), tokenizer_file=root / "tokenizer.json", val_loss=1.5
    )
    return run


EXPORTS = {
    "llama": ({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}, "LlamaForCausalLM"),
    "llama-gqa-untied-bias": (
        {
            "position": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "n_kv_head": 2,
            "tie_embeddings": False,
            "bias": True,
        },
        "LlamaForCausalLM",
    ),
    "qwen3": (
        {
            "position": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "qk_norm": True,
            "n_kv_head": 2,
            "bias": False,
        },
        "Qwen3ForCausalLM",
    ),
    "gpt2-nanogpt": ({"bias": False}, "GPT2LMHeadModel"),
    "gpt2-tanh-untied": ({"mlp": "gelu_tanh", "bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits_and_generation(tmp_path: Path, name: str) -> None:
    options, architecture = EXPORTS[name]
    run = lmforge_run(tmp_path, char_tokenizer(TEXT), **options)
    out = export_checkpoint(run, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == architecture
    ours = load(run, "last", "cpu").model
    idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = ours(idx)
        actual = hf(idx).logits
    assert (actual - expected).abs().max().item() < 1e-4
    prompt = idx[:1, :8]
    ours_tokens = torch.stack(list(generate(ours, prompt, 20, temperature=0)), dim=1)
    hf_tokens = hf.generate(
        prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt)
    )
    assert torch.equal(hf_tokens[:, 8:], ours_tokens)


@pytest.mark.parametrize(
    "make", [lambda: char_tokenizer(TEXT), byte_tokenizer, lambda: train_bpe([TEXT * 20], 300)]
)
def test_exported_tokenizer_gives_the_same_ids(tmp_path: Path, make) -> None:
    tokenizer = make()
    run = lmforge_run(tmp_path, tokenizer, position="rope", norm="rmsnorm", mlp="swiglu")
    out = export_checkpoint(run, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf_tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    ids = tokenizer.encode(TEXT).ids
    assert hf_tokenizer(TEXT)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == TEXT


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"position": "rope", "norm": "rmsnorm", "mlp": "relu2"},
            "model.mlp = 'relu2' has no standard Hugging Face",
        ),
        ({"logit_softcap": 30.0}, "model.logit_softcap = 30.0"),
        ({"position": "rope", "norm": "layernorm", "mlp": "swiglu"}, "model.norm = 'layernorm'"),
        ({"n_kv_head": 2}, "model.n_kv_head = 2"),
        ({"norm": "rmsnorm"}, "model.norm = 'rmsnorm'"),
        (
            {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": True},
            "model.bias = True",
        ),
    ],
)
def test_export_refuses_what_no_hf_architecture_expresses(
    tmp_path: Path, options: dict, message: str
) -> None:
    run = lmforge_run(tmp_path, char_tokenizer(TEXT), **options)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        export_checkpoint(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def random_hf_model(kind: str):
    common = dict(
        vocab_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "llama-tied-bias": lambda: transformers.LlamaConfig(
            attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **common
        ),
        "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common),
        "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "qwen3": lambda: transformers.Qwen3Config(
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, **common
        ),
        # heads wider than hidden_size / num_attention_heads, as Qwen3's and Gemma's (128 against 64)
        "qwen3-wide-heads": lambda: transformers.Qwen3Config(
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common
        ),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=256, n_layer=2, n_head=4, n_embd=32, n_positions=32
        ),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind]()).eval()
    with torch.no_grad():  # randomise what from_config leaves at 1 or 0
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_hf(model, folder: Path, how: str = "safetensors") -> Path:
    if how == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
    else:
        model.save_pretrained(folder)
    if how == "bin":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for file in folder.glob("model*.safetensors*"):
            file.unlink()
        torch.save(state, folder / "pytorch_model.bin")
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize(
    ("kind", "how"),
    [
        ("llama", "safetensors"),
        ("llama-tied-bias", "sharded"),
        ("mistral", "bin"),
        ("qwen2", "safetensors"),
        ("qwen3", "safetensors"),
        ("gpt2", "safetensors"),
        ("gpt2", "bin"),
    ],
)
def test_import_matches_transformers_logits(cli, tmp_path: Path, kind: str, how: str) -> None:
    hf = random_hf_model(kind)
    folder = save_hf(hf, tmp_path / "hf", how)
    if how == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    code, out, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 0, err
    ours = load(tmp_path / "run", "last", "cpu").model
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    code, out, err = cli("sample", tmp_path / "run", "--max-new-tokens", "5", "--prompt", "hi")
    assert code == 0, err


@pytest.mark.parametrize("name", ["llama-gqa-untied-bias", "qwen3", "gpt2-nanogpt", "gpt2-tanh-untied"])
def test_import_of_export_reproduces_the_weights_exactly(tmp_path: Path, name: str) -> None:
    options, _ = EXPORTS[name]
    run = lmforge_run(tmp_path, byte_tokenizer(), **options)
    export_checkpoint(run, tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "back")
    original = load(run, "last", "cpu")
    back = load(tmp_path / "back", "last", "cpu")
    assert back.config.model.bias == original.config.model.bias
    a, b = original.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.bf16
def test_export_shards_and_bf16(tmp_path: Path) -> None:
    run = lmforge_run(
        tmp_path, byte_tokenizer(), position="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False
    )
    out = export_checkpoint(run, tmp_path / "hf", dtype="bf16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_import_errors(cli, tmp_path: Path) -> None:
    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 1 and "missing tensors model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "run").exists()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 1 and "model_type 'bert' is not supported" in err
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 1 and "no tokenizer.json" in err


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_import_never_unpickles_code(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_hf(random_hf_model("gpt2"), tmp_path / "hf", "bin")
    torch.save({"transformer.wte.weight": _Payload()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 1 and "cannot be loaded safely" in err
    assert not (tmp_path / "pwned").exists()


def test_train_init_from_an_imported_model(cli, tmp_path: Path) -> None:
    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    assert cli("import", folder, "--out", tmp_path / "imported")[0] == 0
    (tmp_path / "text.txt").write_text(TEXT * 40)
    assert (
        cli("prepare", tmp_path / "text.txt", "--tokenizer", "byte", "--out", tmp_path / "data", "-q")[0] == 0
    )
    config = tmp_path / "finetune.toml"
    config.write_text(
        f'[data]\ndir = "{tmp_path / "data"}"\n[train]\ninit_from = "{tmp_path / "imported"}"\n'
        'max_steps = 3\nbatch_size = 2\neval_interval = 0\ndevice = "cpu"\n[optim]\nlr = 1e-9\n'
        "[schedule]\nwarmup_steps = 0\nmin_lr = 0.0\n[log]\nprogress = false\n"
    )
    code, _, err = cli("train", config, "--out", tmp_path / "tuned")
    assert code == 0, err
    assert load_config(tmp_path / "tuned" / "config.toml").model.n_kv_head == 2  # the imported architecture
    start = load(tmp_path / "imported", "last", "cpu").model.state_dict()
    tuned = load(tmp_path / "tuned", "last", "cpu").model.state_dict()
    assert all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in start)
    # the imported model's end id (LlamaConfig's eos_token_id 2) carries over to the fine-tuned run
    assert load(tmp_path / "imported", "last", "cpu").end_ids == (2,)
    assert load(tmp_path / "tuned", "last", "cpu").end_ids == (2,)
    code, _, err = cli(
        "train", "--out", tmp_path / "imported", "--resume", "--set", f"data.dir={tmp_path / 'data'}"
    )
    assert code == 1 and "has no training state to resume" in err


# ----------------------------------------------------------------------------- what --overwrite replaces


def llama_run(root: Path) -> Path:
    return lmforge_run(root, char_tokenizer(TEXT), position="rope", norm="rmsnorm", mlp="swiglu")


def test_export_cli_overwrite_replaces_only_an_earlier_export(cli, tmp_path: Path) -> None:
    run = llama_run(tmp_path)
    out = tmp_path / "hf"
    assert cli("export", run, "--out", out)[0] == 0
    before = snapshot(out)
    code, _, err = cli("export", run, "--out", out, "--dtype", "bf16")
    assert code == 1 and "exists and is not empty; pass --overwrite" in err and snapshot(out) == before
    code, _, err = cli("export", run, "--out", out, "--dtype", "bf16", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / ".lmforge").is_file()  # so the next --overwrite knows lmforge wrote it


def test_export_never_replaces_its_own_run(cli, tmp_path: Path) -> None:
    run = llama_run(tmp_path)
    before = snapshot(run)
    code, _, err = cli("export", run, "--out", run, "--overwrite")
    assert code == 1 and "is the input" in err and err.count("\n") == 1
    assert snapshot(run) == before


def test_export_never_replaces_a_folder_that_contains_its_run(cli, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    assert cli("export", llama_run(tmp_path), "--out", parent)[0] == 0  # an export: lmforge's own
    run = llama_run(parent)  # with a run inside it
    before = snapshot(run)
    code, _, err = cli("export", run, "--out", parent, "--overwrite")
    assert code == 1 and "contains the input" in err and err.count("\n") == 1
    assert snapshot(run) == before


def test_export_never_replaces_a_run(cli, tmp_path: Path) -> None:
    imported = tmp_path / "imported"
    assert cli("import", save_hf(random_hf_model("llama"), tmp_path / "hf"), "--out", imported)[0] == 0
    assert json.loads((imported / ".lmforge").read_text())["kind"] == "import"
    before = snapshot(imported)
    code, _, err = cli("export", llama_run(tmp_path), "--out", imported, "--overwrite")
    assert code == 1 and "holds an lmforge imported run, not a Hugging Face export" in err
    assert err.count("\n") == 1 and snapshot(imported) == before


def test_import_never_replaces_its_own_source(cli, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress output
    before = snapshot(folder)
    code, _, err = cli("import", folder, "--out", folder, "--overwrite")
    assert code == 1 and "is the input" in err and err.count("\n") == 1
    assert snapshot(folder) == before


def test_import_overwrite_replaces_an_earlier_import(cli, tmp_path: Path) -> None:
    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    assert cli("import", folder, "--out", tmp_path / "run")[0] == 0
    assert cli("import", folder, "--out", tmp_path / "run")[0] == 1
    code, _, err = cli("import", folder, "--out", tmp_path / "run", "--overwrite")
    assert code == 0, err
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    code, _, err = cli("import", folder, "--out", user, "--overwrite")
    assert code == 1 and "was not written by lmforge" in err and (user / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- the export CLI


def assert_same_logits(hf_dir: Path, checkpoint: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ours = load(checkpoint, "last", "cpu").model
    idx = torch.randint(
        0, ours.config.vocab_size, (2, ours.config.block_size), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4


def test_export_cli_checkpoint_best_last_or_a_folder(cli, tmp_path: Path) -> None:
    run = llama_run(tmp_path)  # step 7, val loss 1.5
    loaded = load(run, "last", "cpu")
    with torch.no_grad():
        for param in loaded.model.parameters():
            param.add_(0.1)
    ckpt.save_checkpoint(
        run,
        9,
        loaded.model,
        state={},
        config=loaded.config,
        tokenizer_file=tmp_path / "tokenizer.json",
        val_loss=2.0,
    )
    step_7, step_9 = (c.path for c in ckpt.list_checkpoints(run))
    for name, which, expected, step in [
        ("best", "best", step_7, 7),  # the lower val loss
        ("last", "last", step_9, 9),
        ("folder", str(step_7), step_7, 7),
    ]:
        code, _, err = cli("export", run, "--out", tmp_path / name, "--checkpoint", which)
        assert code == 0, err
        assert f"- steps: {step}\n" in (tmp_path / name / "README.md").read_text()
        assert_same_logits(tmp_path / name, expected)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_export_cli_dtype_sets_the_weights_dtype(
    cli, tmp_path: Path, dtype: str, torch_dtype: torch.dtype
) -> None:
    from safetensors import safe_open

    code, _, err = cli("export", llama_run(tmp_path), "--out", tmp_path / "hf", "--dtype", dtype)
    assert code == 0, err
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch_dtype}


def test_export_cli_max_shard_size_gives_shards_that_transformers_loads(cli, tmp_path: Path) -> None:
    run = llama_run(tmp_path)
    code, _, err = cli("export", run, "--out", tmp_path / "hf", "--max-shard-size-gb", "0.00002")  # 20 kB
    assert code == 0, err
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "hf" / shard).is_file() for shard in shards)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert_same_logits(tmp_path / "hf", run)


# nan, 0, -1, inf are usage errors (tests/test_bad_input.py); a positive size under one byte is this one.
@pytest.mark.parametrize("size", ["1e-12"])
def test_export_cli_refuses_a_shard_size_that_is_not_a_positive_number(
    cli, tmp_path: Path, size: str
) -> None:
    code, _, err = cli("export", llama_run(tmp_path), "--out", tmp_path / "hf", "--max-shard-size-gb", size)
    assert code == 1 and "--max-shard-size-gb" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("architecture", "options"),
    [
        ("LlamaForCausalLM", ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu"]),
        ("GPT2LMHeadModel", []),  # the default model
    ],
)
def test_a_trained_run_exports_and_loads_in_transformers_with_the_same_logits(
    cli, char_data: Path, tmp_path: Path, architecture: str, options: list[str]
) -> None:
    short = ["train.max_steps=4", "train.eval_interval=2", "train.checkpoint_interval=2"]
    sets = sum((["--set", s] for s in [*TINY, *short, *options, f"data.dir={char_data}"]), [])
    code, _, err = cli("train", "--out", tmp_path / "run", *sets)
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "run", "--out", tmp_path / "hf", "--checkpoint", "last")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert type(hf).__name__ == architecture
    assert_same_logits(tmp_path / "hf", ckpt.list_checkpoints(tmp_path / "run")[-1].path)


def test_the_demo_configs_model_exports_and_loads_in_transformers_with_the_same_logits(
    tmp_path: Path,
) -> None:
    """`make demo`, `lmforge export`, then transformers: no change to the shakespeare-char recipe."""
    demo = load_config(recipe("shakespeare-char").path).model
    options = {k: v for k, v in dataclasses.asdict(demo).items() if v is not None}
    run = lmforge_run(tmp_path, char_tokenizer(TEXT), **options)  # the demo's architecture, its vocabulary
    out = export_checkpoint(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert_same_logits(out, ckpt.list_checkpoints(run)[-1].path)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_export_writes_the_runs_chat_template_for_apply_chat_template(tmp_path: Path) -> None:
    tokenizer = char_tokenizer(TEXT, specials=["<|endoftext|>"])
    run = lmforge_run(tmp_path, tokenizer, position="rope", norm="rmsnorm", mlp="swiglu")
    export_checkpoint(run, tmp_path / "default")  # a run without a template: the default, as `chat` uses
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "default")
    expected = ChatTemplate.default(tokenizer).render(CHAT, add_generation_prompt=True)
    assert exported.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == expected
    checkpoint = ckpt.list_checkpoints(run)[-1].path
    ChatTemplate(CHATML, {"eos_token": "<|endoftext|>"}).save(checkpoint)  # as a fine-tuned run saves it
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"]["tokenizer_config.json"] = file_sha256(checkpoint / "tokenizer_config.json")
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    export_checkpoint(run, tmp_path / "chatml")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "chatml")
    assert exported.chat_template == CHATML
    rendered = exported.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (
        rendered
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_import_keeps_the_source_models_chat_template_and_export_gives_it_back(tmp_path: Path) -> None:
    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    source = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>"
    )
    source.chat_template = CHATML
    source.save_pretrained(folder)
    import_folder(folder, tmp_path / "run")
    template = ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "run")[-1].path)
    assert template == ChatTemplate(CHATML, {"eos_token": "<|im_end|>"})
    assert template.end_of_turn() == "<|im_end|>"  # where `lmforge chat` stops a reply
    export_checkpoint(tmp_path / "run", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(CHAT, tokenize=False) == source.apply_chat_template(CHAT, tokenize=False)
    assert back.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: (f / "chat_template.jinja").symlink_to("/etc/hostname"), "outside the folder"),
        (
            lambda f: (f / "chat_template.jinja").write_text("{% for m in messages %}"),
            "chat template: Unexpected end",
        ),
        (
            lambda f: (f / "tokenizer_config.json").write_text("[1]"),
            "tokenizer_config.json: expected a JSON object",
        ),
        (
            lambda f: (f / "chat_template.jinja").write_bytes(b"\xff{{ x }}"),
            "chat_template.jinja: unreadable",
        ),
    ],
    ids=["link-out", "syntax", "not-an-object", "not-utf8"],
)
def test_import_refuses_a_bad_chat_template_in_one_line(cli, tmp_path: Path, make, message: str) -> None:
    folder = save_hf(random_hf_model("llama"), tmp_path / "hf")
    make(folder)
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    last = err.strip().splitlines()[-1]  # before it: transformers' progress bar from save_pretrained
    assert code == 1 and last.startswith("lmforge import: error: ") and message in last, err
    assert not (tmp_path / "run").exists()
