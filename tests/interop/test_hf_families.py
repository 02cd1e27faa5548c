"""Each supported family with the configuration of a published checkpoint, shrunk: import gives
transformers' logits and greedy text, export goes back to transformers, the chat template is kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import checkpoint as ckpt  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.data.chat_template import ChatTemplate  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.inference.generate import generate  # noqa: E402
from lmforge.interop.hf import export_checkpoint  # noqa: E402
from lmforge.model.gpt import rope_frequencies  # noqa: E402
from tests.interop.test_hf import CHAT, CHATML, save_hf  # noqa: E402

# config.json of each published checkpoint, as its repository holds it (only the transformers
# version and the dtype left out)
PUBLISHED = {
    "meta-llama/Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rope_theta": 500000.0, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 128256,
    },
    "HuggingFaceTB/SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
        "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
        "use_cache": True, "vocab_size": 49152,
    },
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "Qwen/Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "mistralai/Mistral-7B-v0.3": {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": 32768,
    },
    "microsoft/Phi-3-mini-4k-instruct": {
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
        "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": 32064,
    },
}  # fmt: skip

# Width and depth shrunk, each family's shape kept: GQA ratios, Qwen3's head_dim * heads = 2 * hidden
SHRUNK = {
    "meta-llama/Llama-3.2-1B": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                                "head_dim": 16, "intermediate_size": 256},
    "HuggingFaceTB/SmolLM2-135M": {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                                   "intermediate_size": 128},
    "Qwen/Qwen2.5-0.5B-Instruct": {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1,
                                   "intermediate_size": 304},
    "Qwen/Qwen3-0.6B": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16, "intermediate_size": 96},
    "mistralai/Mistral-7B-v0.3": {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                                  "intermediate_size": 224},
    "microsoft/Phi-3-mini-4k-instruct": {"hidden_size": 64, "num_attention_heads": 8,
                                         "num_key_value_heads": 8, "intermediate_size": 170},
}  # fmt: skip
VOCAB = 264  # the byte tokenizer and its added chat tokens, rounded up; ids past it become its last id
# The architecture each family exports as: the simplest standard one that computes the same function
EXPORTED_AS = {
    "meta-llama/Llama-3.2-1B": "LlamaForCausalLM",
    "HuggingFaceTB/SmolLM2-135M": "LlamaForCausalLM",
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen2ForCausalLM",
    "Qwen/Qwen3-0.6B": "Qwen3ForCausalLM",
    "mistralai/Mistral-7B-v0.3": "LlamaForCausalLM",  # its sliding_window is null: Llama's attention
    "microsoft/Phi-3-mini-4k-instruct": "MistralForCausalLM",  # a 2047-token window on every layer
}


def shrunk_config(name: str) -> dict:
    """The published config.json with SHRUNK's sizes, 2 layers and VOCAB tokens."""
    config = copy.deepcopy(PUBLISHED[name]) | SHRUNK[name] | {"num_hidden_layers": 2, "vocab_size": VOCAB}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None and config[key] >= VOCAB:
            config[key] = VOCAB - 1
    return config


def published_model(name: str, folder: Path):
    """A random-weight transformers model of the shrunk published config, saved with a byte
    tokenizer and a ChatML template; norms and biases moved off 1 and 0 so that a wrong mapping shows."""
    config = shrunk_config(name)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(config["model_type"], **fields)
    ).eval()
    with torch.no_grad():
        for param_name, param in hf.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    save_hf(hf, folder)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return hf


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    hf.generation_config.eos_token_id = None  # lmforge's generate never stops early: compare all n
    hf.generation_config.pad_token_id = None
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt))
    return out[:, prompt.size(1) :]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_published_family_imports_and_exports_with_transformers_logits_text_and_template(
    cli, tmp_path: Path, name: str
) -> None:
    hf = published_model(name, tmp_path / "hf")
    code, _, err = cli("import", tmp_path / "hf", "--out", tmp_path / "run")
    assert code == 0, err
    ours = load(tmp_path / "run", "last", "cpu", dtype="fp32").model
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    expected = logits(hf, idx)
    assert (logits(ours, idx) - expected).abs().max().item() < 1e-4  # fp32 on both sides
    prompt = idx[:1, :6]
    ours_text = torch.stack(list(generate(ours, prompt, 24, temperature=0)), dim=1)
    assert torch.equal(ours_text, greedy(hf, prompt, 24))

    export_checkpoint(tmp_path / "run", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == EXPORTED_AS[name]
    assert (logits(back, idx) - expected).abs().max().item() < 1e-4
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    back_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back_tokenizer.chat_template == CHATML
    assert back_tokenizer.apply_chat_template(CHAT, tokenize=False) == source_tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )


def test_llama_3_rope_scaling_is_imported_and_exported_exactly(cli, tmp_path: Path) -> None:
    published_model("meta-llama/Llama-3.2-1B", tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3"  # transformers 5's spelling on disk
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "run")[0] == 0
    m = load(tmp_path / "run", "last", "cpu").config.model
    assert (m.rope_scaling, m.rope_factor, m.rope_theta) == ("llama3", 32.0, 500000.0)
    assert (m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_context) == (1.0, 4.0, 8192)
    export_checkpoint(tmp_path / "run", tmp_path / "back")
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["rope_scaling"] == PUBLISHED["meta-llama/Llama-3.2-1B"]["rope_scaling"]
    assert exported["rope_theta"] == 500000.0


def test_the_published_spelling_rope_scaling_and_rope_theta_imports_with_equal_logits(
    cli, tmp_path: Path
) -> None:
    """config.json as the Hub holds it (top-level rope_theta and rope_scaling), not as transformers 5
    rewrites it: both spellings give one model."""
    hf = published_model("meta-llama/Llama-3.2-1B", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(shrunk_config("meta-llama/Llama-3.2-1B")))
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "run")[0] == 0
    ours = load(tmp_path / "run", "last", "cpu", dtype="fp32").model
    idx = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(5))
    assert (logits(ours, idx) - logits(hf, idx)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
)  # fmt: skip
def test_rope_frequencies_are_transformers_own(scaling: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )  # fmt: skip
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours = rope_frequencies(
        ModelConfig(
            n_head=2, d_model=64, block_size=256, position="rope", rope_theta=500000.0,
            rope_scaling=scaling["rope_type"], rope_factor=scaling["factor"],
            rope_low_freq_factor=scaling.get("low_freq_factor", 1.0),
            rope_high_freq_factor=scaling.get("high_freq_factor", 4.0),
            rope_original_context=scaling.get("original_max_position_embeddings"),
        )
    )  # fmt: skip
    assert attention_factor == 1.0 and torch.equal(ours, theirs)
    plain = rope_frequencies(ModelConfig(n_head=2, d_model=64, position="rope", rope_theta=500000.0))
    assert scaling["rope_type"] == "dynamic" or not torch.equal(ours, plain)  # the scaling did something


def test_a_sliding_window_shorter_than_the_text_matches_transformers(cli, tmp_path: Path) -> None:
    """Mistral's window (here 8 tokens) in one forward and in generation past it, through the KV cache."""
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=8,
        )
    ).eval()  # fmt: skip
    save_hf(hf, tmp_path / "hf")
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "run")[0] == 0
    loaded = load(tmp_path / "run", "last", "cpu", dtype="fp32")
    assert loaded.config.model.sliding_window == 8
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(6))
    full = logits(hf, idx)
    assert (logits(loaded.model, idx) - full).abs().max().item() < 1e-4
    window_ignored = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", sliding_window=None
    ).eval()
    assert (logits(window_ignored, idx) - full).abs().max().item() > 1e-3  # the window matters here
    prompt = idx[:1, :4]
    ours_text = torch.stack(list(generate(loaded.model, prompt, 30, temperature=0)), dim=1)
    assert torch.equal(ours_text, greedy(hf, prompt, 30))
    export_checkpoint(tmp_path / "run", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.sliding_window == 8 and (logits(back, idx) - full).abs().max().item() < 1e-4


def test_the_imported_chat_template_is_the_one_lmforge_chat_renders(tmp_path: Path) -> None:
    published_model("Qwen/Qwen2.5-0.5B-Instruct", tmp_path / "hf")
    from lmforge.interop.hf import import_folder

    import_folder(tmp_path / "hf", tmp_path / "run")
    template = ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "run")[-1].path)
    assert template is not None and template.source == CHATML


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "microsoft/Phi-3-mini-4k-instruct"])
def test_an_imported_family_fine_tunes_with_lora_and_exports_merged(cli, tmp_path: Path, name: str) -> None:
    published_model(name, tmp_path / "hf")
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "imported")[0] == 0
    (tmp_path / "sft").mkdir()
    for split in ("train", "val"):
        rows = [{"prompt": f"Q{i}: to be? ", "completion": "or not to be."} for i in range(8)]
        (tmp_path / "sft" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = [
        f"data.dir={tmp_path / 'sft'}", f"train.init_from={tmp_path / 'imported'}", "train.max_steps=2",
        "train.batch_size=2", "train.eval_interval=0", "train.device=cpu", "train.dtype=fp32",
        "optim.lr=0.05", "schedule.warmup_steps=0", "lora.rank=2", "log.progress=false",
    ]  # fmt: skip
    code, _, err = cli("finetune", "--out", tmp_path / "tuned", *sum((["--set", s] for s in settings), []))
    assert code == 0, err
    tuned = load(tmp_path / "tuned", "last", "cpu", dtype="fp32").model  # adapters merged
    start = load(tmp_path / "imported", "last", "cpu", dtype="fp32").model
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(8))
    assert (logits(tuned, idx) - logits(start, idx)).abs().max().item() > 1e-4  # the adapters learned
    export_checkpoint(tmp_path / "tuned", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (logits(back, idx) - logits(tuned, idx)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "scaling", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}]
)
def test_linear_and_dynamic_rope_scaling_import_and_export_exactly(
    cli, tmp_path: Path, scaling: dict
) -> None:
    config = shrunk_config("HuggingFaceTB/SmolLM2-135M") | {
        "max_position_embeddings": 64,
        "rope_scaling": scaling,
    }
    published_model("HuggingFaceTB/SmolLM2-135M", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # with the scaling
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "run")[0] == 0
    ours = load(tmp_path / "run", "last", "cpu", dtype="fp32").model
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9))
    assert (logits(ours, idx) - logits(hf, idx)).abs().max().item() < 1e-4
    export_checkpoint(tmp_path / "run", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"] == scaling
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (logits(back, idx) - logits(hf, idx)).abs().max().item() < 1e-4
