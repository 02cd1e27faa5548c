"""Gemma 2 and Gemma 3 (text): import, export, train and LoRA, checked against transformers itself.

Each model is the published checkpoint's config.json, every field as published, shrunk in width and
depth only: the sizes below replace the published ones. The sliding window is shrunk too where a
sequence longer than the published one would cost gigabytes of attention scores (Gemma 2's 4096,
Gemma 3 27B's 1024); Gemma 3 1B keeps its 512. Every sequence is longer than its model's window,
and every model has both local and global layers, so the window, the two RoPE bases and the layer
pattern all show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import checkpoint as ckpt  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.data.chat_template import ChatTemplate  # noqa: E402
from lmforge.data.tokenizer import byte_tokenizer  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.inference.generate import generate  # noqa: E402
from lmforge.interop.hf import export_checkpoint, hf_family, import_folder, model_config_from_hf  # noqa: E402
from lmforge.model import KVCache  # noqa: E402
from tests.conftest import PIN_FP32  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gemma"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]  # ids 256..260
VOCAB = 264  # the byte tokenizer's 256 ids and Gemma's specials (Gemma's vocabularies are larger too)

# config.json of google/gemma-2-2b, as published
GEMMA_2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}
# config.json of google/gemma-3-1b-it, as published
GEMMA_3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "use_cache": True,
    "vocab_size": 262144,
}
# the text_config of google/gemma-3-27b-it as published (transformers' defaults fill in the rest:
# RoPE bases 1,000,000 and 10,000, sliding_window_pattern 6), as a text-only Gemma3ForCausalLM:
# linear RoPE scaling on the global layers, and a query_pre_attn_scalar (168) that is not head_dim
GEMMA_3_27B_TEXT = {
    "architectures": ["Gemma3ForCausalLM"],
    "head_dim": 128,
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "model_type": "gemma3_text",
    "num_attention_heads": 32,
    "num_hidden_layers": 62,
    "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
}
SHRUNK = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "vocab_size": VOCAB}
# 32 heads and 16 key/value heads shrunk too (the ratio kept), and the context from the default
# 131,072: lmforge's generate allocates a cache for the whole context of every layer
GEMMA_3_27B_SHRUNK = {
    "num_hidden_layers": 7,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "sliding_window": 48,
    "max_position_embeddings": 4096,
}
MODELS = {  # name: (config.json, the sequence length that the tests run)
    "gemma-2-2b": (GEMMA_2_2B | SHRUNK | {"num_hidden_layers": 4, "sliding_window": 48}, 80),
    "gemma-3-1b-it": (GEMMA_3_1B | SHRUNK | {"num_hidden_layers": 7}, 530),
    "gemma-3-27b-it-text": (GEMMA_3_27B_TEXT | SHRUNK | GEMMA_3_27B_SHRUNK, 80),
}
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def gemma_tokenizer():
    """Byte-level ids 0..255, then Gemma's special tokens."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def gemma_folder(root: Path, name: str) -> tuple[Path, torch.nn.Module]:
    """A Hugging Face folder of a random-weight `name`, saved by transformers (config.json in its own
    spelling: rope_parameters, layer_types), with a tokenizer; and the transformers model itself."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(MODELS[name][0]))
    config = transformers.AutoConfig.from_pretrained(root)  # transformers' reading of the published fields
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # Gemma's norms start at 0, a scale of 1: move them so that a wrong 1 + w shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(root)
    gemma_tokenizer().save(str(root / "tokenizer.json"))
    return root, model


def tokens(name: str, rows: int = 1, seed: int = 1) -> torch.Tensor:
    """(rows, T) random ids, T longer than the model's sliding window."""
    return torch.randint(0, 256, (rows, MODELS[name][1]), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(MODELS))
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(name, HF folder, transformers model, lmforge run imported from the folder), once per model."""
    root = tmp_path_factory.mktemp(request.param)
    folder, hf = gemma_folder(root / "hf", request.param)
    import_folder(folder, root / "run")
    return request.param, folder, hf, root / "run"


def test_import_gives_transformers_logits_and_greedy_text(imported) -> None:
    name, folder, hf, run = imported
    config = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in config and "layer_types" in config  # transformers 5's own spelling
    ours = load(run, "last", "cpu", dtype="fp32").model
    m = ours.config
    assert m.sliding_window == MODELS[name][0]["sliding_window"] < MODELS[name][1]
    assert 0 < m.global_every < m.n_layer  # local and global layers both
    idx = tokens(name, rows=2)
    with torch.no_grad():
        expected = hf(idx).logits
        assert (ours(idx)[0] - expected).abs().max().item() < 1e-4
    prompt = idx[:1, :-8]
    ours_text = torch.stack(list(generate(ours, prompt, 8, temperature=0)), dim=1)
    hf.generation_config.eos_token_id = None  # eight tokens on both sides, whatever they are
    hf_text = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(hf_text[:, prompt.size(1) :], ours_text)


def test_the_published_spelling_reads_as_transformers_5_writes_it(imported) -> None:
    """config.json as published (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
    and as transformers 5 saves it (rope_parameters per layer type, layer_types) give one model."""
    name, folder, _, _ = imported
    saved = model_config_from_hf(json.loads((folder / "config.json").read_text()), "saved")
    assert model_config_from_hf(MODELS[name][0], "published") == saved
    expected = {
        "gemma-2-2b": (10000.0, None, 1.0, 2, 50.0, 30.0, 256),
        "gemma-3-1b-it": (1e6, 10000.0, 1.0, 6, None, None, 256),
        "gemma-3-27b-it-text": (1e6, 10000.0, 8.0, 6, None, None, 168),
    }[name]
    assert (
        saved.rope_theta,
        saved.rope_local_theta,
        saved.rope_factor,
        saved.global_every,
        saved.attn_softcap,
        saved.logit_softcap,
        saved.attn_scale_dim,
    ) == expected


def test_export_gives_transformers_the_same_model(imported, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    name, folder, hf, run = imported
    out = export_checkpoint(run, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    family = json.loads((folder / "config.json").read_text())["model_type"]
    assert type(back).__name__ == ARCHITECTURES[family]
    idx = tokens(name, seed=2)
    with torch.no_grad():
        assert (back(idx).logits - hf(idx).logits).abs().max().item() < 1e-4
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)  # the (1 + w) norms too
    assert import_folder(out, tmp_path / "again") and load(
        tmp_path / "again", "last", "cpu"
    ).config.model == (load(run, "last", "cpu").config.model)


def test_cache_rows_at_their_own_lengths_see_their_own_window(imported) -> None:
    """`lmforge serve` decodes rows of different lengths together: each keeps its own window."""
    name, _, _, run = imported
    model = load(run, "last", "cpu", dtype="fp32").model
    window = model.config.sliding_window
    lengths = [MODELS[name][1], window - 5, window + 3]
    prompts = [tokens(name, seed=s)[:, :n] for s, n in enumerate(lengths)]
    with torch.inference_mode():
        batched = KVCache.allocate(model, 3, max(lengths) + 1)
        for row, prompt in enumerate(prompts):  # prefilled alone, as the server does
            view = KVCache(
                [k[row : row + 1] for k in batched.keys], [v[row : row + 1] for v in batched.values]
            )
            model(prompt, cache=view)
        batched.length = torch.tensor(lengths)
        step = torch.tensor([[7], [8], [9]])
        logits, _ = model(step, cache=batched)
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.cat([prompt, step[row : row + 1]], dim=1))
            torch.testing.assert_close(logits[row, -1], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_import_keeps_gemmas_chat_template_and_export_gives_it_back(tmp_path: Path) -> None:
    folder, _ = gemma_folder(tmp_path / "hf", "gemma-3-1b-it")
    source = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    source.chat_template = (FIXTURES / "gemma3_chat_template.jinja").read_text()
    source.save_pretrained(folder)
    import_folder(folder, tmp_path / "run")
    template = ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "run")[-1].path)
    assert template.source == source.chat_template
    assert template.end_of_turn() == "<end_of_turn>"  # where `lmforge chat` stops a reply
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n")
    assert template.render(chat, add_generation_prompt=True) == rendered
    export_checkpoint(tmp_path / "run", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == rendered


def published(name: str, **changes) -> dict:
    return {k: v for k, v in (MODELS[name][0] | changes).items() if v is not ...}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": {}},
            "model_type 'gemma3' (Gemma 3 with a vision tower, Gemma3ForConditionalGeneration) is not",
        ),
        (published("gemma-3-1b-it", hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
        (published("gemma-2-2b", attention_bias=True), "attention_bias = true is not supported"),
        (
            published("gemma-3-1b-it", use_bidirectional_attention=True),
            "use_bidirectional_attention = true is not supported",
        ),
        (
            published("gemma-3-1b-it", attn_logit_softcapping=50.0),
            "attn_logit_softcapping is not supported for Gemma 3",
        ),
        (
            published(
                "gemma-2-2b",
                layer_types=["sliding_attention", "full_attention", "full_attention", "full_attention"],
            ),
            "layer_types is not supported",
        ),
        (published("gemma-2-2b", layer_types=["local"] * 4), "layer_types must name"),
        (
            published("gemma-3-1b-it", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling.rope_type 'yarn' is not supported",
        ),
        (
            published(
                "gemma-3-1b-it",
                rope_theta=...,
                rope_local_base_freq=...,
                rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}},
            ),
            "rope_parameters.full_attention.rope_type 'dynamic' is not supported",
        ),
        (
            published(
                "gemma-3-1b-it",
                rope_parameters={
                    "full_attention": {"rope_theta": 5e5},
                    "sliding_attention": {"rope_theta": 1e4},
                },
            ),
            "disagree with rope_parameters",
        ),
        (
            published(
                "gemma-3-27b-it-text",
                rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}},
            ),
            "rope_parameters.sliding_attention: RoPE scaling is not supported",
        ),
        (
            published("gemma-2-2b", rope_scaling={"rope_type": "linear", "factor": 2.0}),
            "RoPE scaling is not supported for Gemma 2",
        ),
        (published("gemma-2-2b", query_pre_attn_scalar=0.5), "query_pre_attn_scalar must be an integer"),
        (
            published("gemma-2-2b", final_logit_softcapping=-1),
            "final_logit_softcapping must be a finite number > 0",
        ),
    ],
    ids=[
        "multimodal",
        "activation",
        "bias",
        "bidirectional",
        "gemma3-attn-softcap",
        "irregular-layers",
        "unknown-layer-type",
        "yarn",
        "dynamic",
        "both-spellings-disagree",
        "scaled-local-rope",
        "gemma2-scaling",
        "scalar",
        "cap",
    ],
)
def test_import_refuses_what_it_cannot_compute_in_one_line(
    cli, tmp_path: Path, config: dict, message: str
) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    gemma_tokenizer().save(str(folder / "tokenizer.json"))
    code, _, err = cli("import", folder, "--out", tmp_path / "run")
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"post_norms": True}, "model.post_norms = True exports only as Gemma 2 or 3"),
        ({"sliding_window": 8, "norm": "rmsnorm"}, "model.norm = 'rmsnorm' has no standard Hugging Face"),
        ({"qk_norm": True, "attn_softcap": 50.0}, "model.attn_softcap = 50.0 has no standard"),
        ({"rope_local_theta": 1e4}, "model.rope_local_theta = 10000.0 has no standard"),
    ],
)
def test_export_refuses_gemma_options_that_no_gemma_computes(options: dict, message: str) -> None:
    gemma = dict(
        n_layer=2,
        n_head=4,
        d_model=32,
        vocab_size=64,
        position="rope",
        norm="rmsnorm1p",
        mlp="geglu",
        post_norms=True,
        embed_scale=True,
        bias=False,
        sliding_window=8,
        global_every=2,
    )
    plain = dict(
        n_layer=2, n_head=4, d_model=32, vocab_size=64, position="rope", norm="rmsnorm", mlp="swiglu"
    )
    base = plain if set(options) <= {"post_norms", "head_dim"} else gemma
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        hf_family(ModelConfig(**(base | options)))


def finetune_data(folder: Path) -> Path:
    """Prompt/completion examples longer than the models' windows (48 positions)."""
    folder.mkdir()
    lines = [
        "To be, or not to be: that is the question: whether 'tis nobler in the mind to suffer",
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    ]
    for split, n in [("train", 16), ("val", 4)]:
        examples = [{"prompt": lines[i % 2][:40], "completion": lines[i % 2][40:]} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    return folder


# Gemma 2 (full) and Gemma 3 27B (LoRA; QK-norm and two RoPEs) cover the options; Gemma 3 1B adds none
@pytest.mark.parametrize("imported", ["gemma-2-2b", "gemma-3-27b-it-text"], indirect=True)
def test_an_imported_gemma_fine_tunes(cli, imported, tmp_path: Path) -> None:
    """Gemma 2 fully (its soft-capped attention's backward included), Gemma 3 27B with LoRA: each starts
    from the import and its loss falls; LoRA trains adapters on every block matrix, and the export
    (adapters merged) is what transformers computes."""
    name, _, _, run = imported
    lora = name == "gemma-3-27b-it-text"
    sets = [
        f"data.dir={finetune_data(tmp_path / 'data')}",
        f"train.init_from={run}",
        "train.max_steps=10",
        "train.batch_size=4",
        "train.eval_interval=0",
        "train.device=cpu",
        "optim.lr=3e-3",
        "schedule.warmup_steps=0",
        "log.progress=false",
        PIN_FP32,
    ]
    if lora:
        sets += ["lora.rank=4", "optim.lr=3e-2"]
    code, _, err = cli("finetune", "--out", tmp_path / "tuned", *sum((["--set", s] for s in sets), []))
    assert code == 0, err
    lines = (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()
    losses = [e["loss"] for e in map(json.loads, lines) if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])
    if lora:
        from safetensors.torch import load_file

        raw = load_file(ckpt.list_checkpoints(tmp_path / "tuned")[-1].path / "model.safetensors")
        adapters = [k for k in raw if "lora_B" in k]
        assert adapters and all(
            any(f".{target}.lora_B" in k for k in adapters) for target in ("qkv", "proj", "up", "down")
        )
    tuned = load(tmp_path / "tuned", "last", "cpu", dtype="fp32").model  # LoRA: the adapters merged in
    out = export_checkpoint(tmp_path / "tuned", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = tokens(name, seed=3)
    with torch.no_grad():
        assert (hf(idx).logits - tuned(idx)[0]).abs().max().item() < 1e-4
