"""Hugging Face interop: lmforge checkpoints ⇄ standard `transformers` model folders.

Architectures (no custom code on either side):
    RoPE + RMSNorm + SwiGLU                ⇄ LlamaForCausalLM (Llama 3.x with its rope_scaling, SmolLM2)
        + biases on q, k, v only           ⇄ Qwen2ForCausalLM (Qwen2, Qwen2.5)
        + QK-norm                          ⇄ Qwen3ForCausalLM
        + a sliding window on every layer  ⇄ MistralForCausalLM (also read: Phi3ForCausalLM, whose
                                             fused qkv and gate/up are lmforge's own layout)
    Gemma's options (gemma.py)             ⇄ Gemma2ForCausalLM, Gemma3ForCausalLM (text)
    learned positions + LayerNorm + GELU   ⇄ GPT2LMHeadModel
Any other option combination, and any config.json field lmforge would only approximate, is refused
by name rather than written or read as a model with wrong outputs. Nothing here imports
`transformers`: the files are written and read directly, so export and import work without the `hf`
extra (the tests check them with it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import Config, ModelConfig, head_size, validate
from lmforge.data.chat_template import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, ChatTemplate, special_tokens_of
from lmforge.data.tokenizer import EOT, GENERATION_CONFIG, parse_end_ids
from lmforge.errors import LmforgeError
from lmforge.interop import gemma
from lmforge.interop.hub import cache_blobs
from lmforge.interop.keys import need as _need
from lmforge.interop.keys import present as _present
from lmforge.interop.keys import read_bool as _bool
from lmforge.interop.keys import read_float as _float
from lmforge.interop.keys import read_int as _int
from lmforge.jsonl import loads, read_json_object
from lmforge.model.gpt import mlp_hidden_size
from lmforge.staging import check_out, staged_folder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from lmforge.inference import InferenceSession

Tensors = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- export


def hf_family(m: ModelConfig) -> str:
    """The HF family that expresses this architecture exactly: llama, qwen2, qwen3, mistral, gpt2,
    gemma2 or gemma3_text."""

    def refuse(option: str, value: object, need: str) -> LmforgeError:
        return LmforgeError(f"model.{option} = {value!r} has no standard Hugging Face architecture ({need})")

    if (family := gemma.gemma_family(m)) is not None:
        return family
    if m.logit_softcap is not None:
        raise refuse("logit_softcap", m.logit_softcap, "Llama, Qwen and GPT-2 have no logit soft-capping")
    if m.position == "rope":
        return _rope_family(m, refuse)
    need = (
        "learned positions export as GPT-2, which needs norm = layernorm, mlp = gelu or gelu_tanh, "
        "no GQA, no QK-norm, no sliding window"
    )
    if m.norm != "layernorm":
        raise refuse("norm", m.norm, need)
    if m.mlp not in ("gelu", "gelu_tanh"):
        raise refuse("mlp", m.mlp, need)
    for option, plain in [
        ("n_kv_head", (None, m.n_head)),
        ("qk_norm", (False,)),
        ("sliding_window", (None,)),
    ]:
        if getattr(m, option) not in plain:
            raise refuse(option, getattr(m, option), need)
    if m.head_dim not in (None, m.d_model // m.n_head):
        raise refuse("head_dim", m.head_dim, need)
    return "gpt2"


def _rope_family(m: ModelConfig, refuse: Callable[[str, object, str], LmforgeError]) -> str:
    """Qwen3 for QK-norm, Qwen2 for biases on q, k, v only, Mistral for a sliding window, else Llama."""
    need = "RoPE models export as Llama/Qwen/Mistral, which need norm = rmsnorm and mlp = swiglu"
    if m.norm != "rmsnorm":
        raise refuse("norm", m.norm, need)
    if m.mlp != "swiglu":
        raise refuse("mlp", m.mlp, need)
    if m.qk_norm and m.bias:
        raise refuse("bias", m.bias, "Qwen3, the QK-norm architecture, has no MLP biases")
    qkv_only = m.qkv_bias and not m.bias
    if m.sliding_window is not None:
        for option, value in [("qk_norm", m.qk_norm), ("bias", m.bias), ("qkv_bias", qkv_only)]:
            if value:
                raise refuse(
                    option, value, "Mistral, the sliding-window architecture, has no biases or QK-norm"
                )
        return "mistral"
    if m.qk_norm and qkv_only:
        raise refuse("qkv_bias", m.qkv_bias, "Qwen3 has biases on o_proj too where it has them on q, k, v")
    return "qwen3" if m.qk_norm else "qwen2" if qkv_only else "llama"


# (lmforge, GPT-2) names of each block's norms and linears; GPT-2's linears are Conv1D, stored [in, out]
GPT2_NORMS = [("norm1", "ln_1"), ("norm2", "ln_2")]
GPT2_LINEARS = [
    ("attn.qkv", "attn.c_attn"),
    ("attn.proj", "attn.c_proj"),
    ("mlp.up", "mlp.c_fc"),
    ("mlp.down", "mlp.c_proj"),
]


def to_hf(state: Tensors, m: ModelConfig, family: str) -> Tensors:
    """lmforge state dict → HF tensor names and layouts (biases lmforge lacks become zeros)."""
    if family in gemma.MODEL_TYPES:
        out = gemma.to_hf(state, m)
    else:
        out = _gpt2_to_hf(state, m) if family == "gpt2" else _llama_to_hf(state, m, family)
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    return out


def _bias_or_zeros(state: Tensors, name: str, size: int) -> torch.Tensor:
    return state.get(name, torch.zeros(size, dtype=state[name.replace(".bias", ".weight")].dtype))


def _gpt2_to_hf(state: Tensors, m: ModelConfig) -> Tensors:
    d = m.d_model
    out = {
        "transformer.wte.weight": state["embed.weight"],
        "transformer.wpe.weight": state["pos_embed.weight"],
    }
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in GPT2_NORMS:
            out[h + theirs + ".weight"] = state[b + ours + ".weight"]
            out[h + theirs + ".bias"] = _bias_or_zeros(state, b + ours + ".bias", d)
        for ours, theirs in GPT2_LINEARS:
            weight = state[b + ours + ".weight"]
            out[h + theirs + ".weight"] = weight.t().contiguous()  # GPT-2's Conv1D stores [in, out]
            out[h + theirs + ".bias"] = _bias_or_zeros(state, b + ours + ".bias", weight.shape[0])
    out["transformer.ln_f.weight"] = state["norm.weight"]
    out["transformer.ln_f.bias"] = _bias_or_zeros(state, "norm.bias", d)
    return out


def _llama_to_hf(state: Tensors, m: ModelConfig, family: str) -> Tensors:
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(m.n_layer):
        out.update(_llama_layer_to_hf(state, m, family, b=f"blocks.{i}.", p=f"model.layers.{i}."))
    out["model.norm.weight"] = state["norm.weight"]
    return out


def _llama_layer_to_hf(state: Tensors, m: ModelConfig, family: str, *, b: str, p: str) -> Tensors:
    """One block: lmforge's fused qkv and gate+up matrices become Llama's separate projections."""
    hd = head_size(m)
    q_size, kv_size = m.n_head * hd, (m.n_kv_head or m.n_head) * hd
    hidden = mlp_hidden_size(m)
    out: Tensors = {}
    norms = [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")]
    if family == "qwen3":
        norms += [("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm")]
    for ours, theirs in norms:
        out[p + theirs + ".weight"] = state[b + ours + ".weight"]
    for part, start, size in [
        ("q_proj", 0, q_size),
        ("k_proj", q_size, kv_size),
        ("v_proj", q_size + kv_size, kv_size),
    ]:
        out[p + f"self_attn.{part}.weight"] = state[b + "attn.qkv.weight"][start : start + size].contiguous()
        if m.bias or m.qkv_bias:
            out[p + f"self_attn.{part}.bias"] = state[b + "attn.qkv.bias"][start : start + size].contiguous()
    gate, up = state[b + "mlp.up.weight"].split(hidden)
    out[p + "mlp.gate_proj.weight"] = gate.contiguous()
    out[p + "mlp.up_proj.weight"] = up.contiguous()
    out[p + "self_attn.o_proj.weight"] = state[b + "attn.proj.weight"]
    out[p + "mlp.down_proj.weight"] = state[b + "mlp.down.weight"]
    if m.bias:
        gate_bias, up_bias = state[b + "mlp.up.bias"].split(hidden)
        out[p + "mlp.gate_proj.bias"] = gate_bias.contiguous()
        out[p + "mlp.up_proj.bias"] = up_bias.contiguous()
        out[p + "self_attn.o_proj.bias"] = state[b + "attn.proj.bias"]
        out[p + "mlp.down_proj.bias"] = state[b + "mlp.down.bias"]
    return out


def hf_config(m: ModelConfig, family: str, eot_id: int | None, *, dtype: str) -> dict:
    """The config.json of `family` that describes this model exactly."""
    if family in gemma.MODEL_TYPES:
        return gemma.hf_config(m, family, eot_id, dtype=dtype)
    common = {
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": m.d_model,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_positions": m.block_size,
            "n_inner": mlp_hidden_size(m),
            "activation_function": "gelu_new" if m.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "hidden_size": m.d_model,
        "intermediate_size": mlp_hidden_size(m),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": head_size(m),
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": _rope_scaling(m),
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        **common,
    }
    if family == "llama":
        config.update(attention_bias=m.bias, mlp_bias=m.bias)
    elif family == "mistral":
        config["sliding_window"] = m.sliding_window
    else:  # Qwen2 and Qwen3: full attention on every layer
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layer)
        if family == "qwen3":
            config["attention_bias"] = m.bias
    return config


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def _rope_scaling(m: ModelConfig) -> dict | None:
    """config.json's rope_scaling for model.rope_scaling, which transformers 4 and 5 both read."""
    if m.rope_scaling == "none":
        return None
    scaling = {"rope_type": m.rope_scaling, "factor": m.rope_factor}
    if m.rope_scaling == "llama3":
        scaling |= {
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_context,
        }
    return scaling


def save_shards(tensors: Tensors, out: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or numbered shards plus model.safetensors.index.json above the threshold."""
    shards: list[Tensors] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def tokenizer_files(eot_id: int | None, block_size: int, template: ChatTemplate) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json, so AutoTokenizer loads tokenizer.json and
    `apply_chat_template` renders conversations as lmforge does (the template's bos/eos tokens win)."""
    specials = {"bos_token": EOT, "eos_token": EOT} if eot_id is not None else {}
    specials |= template.special_tokens
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "chat_template": template.source,
        **specials,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


# ----------------------------------------------------------------------------- import

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", *gemma.MODEL_TYPES)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# transformers' default rope_theta for Llama, Mistral, Qwen2 and Qwen3 alike, used when config.json names
# none: then lmforge builds the model transformers itself would load from the folder.
HF_DEFAULT_ROPE_THETA = 10000.0
LAYER_NAME = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.")


def read_hf_config(folder: Path) -> dict:
    """config.json of an HF folder as a JSON object, with one-line errors for anything else."""
    if not (folder / "config.json").exists():
        raise LmforgeError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return read_json_object(folder_file(folder, "config.json", str(folder)))


def read_hf_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer.json (what the imported run will use), once it is known to exist, lie
    inside the folder and load."""
    from lmforge.data.tokenizer import load_tokenizer

    if not (folder / "tokenizer.json").exists():
        raise LmforgeError(f"{folder}: no tokenizer.json (lmforge needs the fast-tokenizer file)")
    return load_tokenizer(folder_file(folder, "tokenizer.json", str(folder)))


def hf_end_ids(folder: Path, config: dict, vocab_size: int) -> tuple[int, ...]:
    """The ids that end the folder's model's completions, where transformers' `generate` finds them:
    generation_config.json's eos_token_id (an int or a list), else config.json's, else the id of
    tokenizer_config.json's eos_token in tokenizer.json; () where none names one."""
    from lmforge.data.tokenizer import load_tokenizer

    generation = folder / GENERATION_CONFIG
    for origin, content in [(generation, read_json_object(generation)), (folder / "config.json", config)]:
        ids = parse_end_ids(content.get("eos_token_id"), origin)
        if not ids:
            continue
        # an id past the vocabulary is never generated, so never ends anything: transformers' GPT-2
        # config says 50256 at any vocab_size
        return tuple(dict.fromkeys(i for i in ids if i < vocab_size))  # in order, once each
    text = special_tokens_of(folder).get("eos_token")
    found = load_tokenizer(folder / "tokenizer.json").token_to_id(text) if text is not None else None
    return (found,) if found is not None and found < vocab_size else ()


def folder_file(folder: Path, name: str, origin: str) -> Path:
    """`folder / name`, once it is known to be a regular file inside the folder, links resolved.

    Names come from files of the folder (an index), so `../x`, an absolute path or a link out of the
    folder must not reach the rest of the disk; a FIFO or device would block or never end. In a Hub
    cache snapshot, links into the same cache repository's `blobs/` are how the files are stored.
    """
    path = folder / name
    resolved = path.resolve()
    blobs = cache_blobs(folder)
    if not resolved.is_relative_to(folder.resolve()) and not (blobs and resolved.is_relative_to(blobs)):
        where = f"the folder {folder}" + (f" and its cache's {blobs}" if blobs else "")
        raise LmforgeError(f"{origin}: {name} resolves to {resolved}, outside {where}")
    if not resolved.exists():
        raise LmforgeError(f"{origin}: {name}: not found")
    if not stat.S_ISREG(resolved.stat().st_mode):
        raise LmforgeError(f"{origin}: {name}: not a regular file")
    return path


def read_hf_weights(folder: Path) -> Tensors:
    """Single or sharded safetensors, else pytorch_model.bin loaded with weights_only=True."""
    for index_name, loader in zip(WEIGHT_INDEXES, (_load_safetensors, _load_bin)):
        if (folder / index_name).exists():
            index = folder_file(folder, index_name, str(folder))
            tensors: Tensors = {}
            for file in _index_files(index):
                tensors.update(loader(folder_file(folder, file, str(index))))
            return tensors
    for name, loader in [("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)]:
        if (folder / name).exists() or (folder / name).is_symlink():
            return loader(folder_file(folder, name, str(folder)))
    raise LmforgeError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


def _index_files(index: Path) -> list[str]:
    """The distinct file names of an index's weight_map, in sorted order."""
    try:
        content = loads(index.read_text())
    except (ValueError, OSError) as exc:
        raise LmforgeError(f"{index}: not valid JSON ({exc})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise LmforgeError(f"{index}: expected an object with a 'weight_map' object")
    if not all(isinstance(file, str) and file for file in weight_map.values()):
        raise LmforgeError(f"{index}: weight_map values must be file names")
    return sorted(set(weight_map.values()))


def _load_safetensors(path: Path) -> Tensors:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LmforgeError(f"{path}: unreadable safetensors file ({exc})") from None


def _load_bin(path: Path) -> Tensors:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickled code: report, never execute
        raise LmforgeError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {exc})") from None


def model_config_from_hf(config: dict, origin: str) -> ModelConfig:
    """ModelConfig from a config.json of a supported family; refuses what lmforge cannot express.

    Every key is type-checked strictly (no "4" or 4.0 for 4, no "false" for false) and the result
    passes the same `validate` as a TOML config.
    """
    if not isinstance(config, dict):
        raise LmforgeError(f"{origin}: expected a JSON object")
    kind = config.get("model_type")
    if kind in (*gemma.MODEL_TYPES, gemma.MULTIMODAL):
        m = gemma.model_config(config, origin)
        validate(Config(model=m), origin)
        return m
    if kind not in SUPPORTED:
        raise LmforgeError(
            f"{origin}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    m = _gpt2_model_config(config, origin) if kind == "gpt2" else _llama_model_config(config, kind, origin)
    validate(Config(model=m), origin)
    return m


def _gpt2_model_config(config: dict, origin: str) -> ModelConfig:
    _need(
        not _bool(config, "scale_attn_by_inverse_layer_idx", origin, default=False),
        origin,
        "scale_attn_by_inverse_layer_idx is not supported",
    )
    _need(
        _bool(config, "scale_attn_weights", origin, default=True),
        origin,
        "scale_attn_weights = false is not supported",
    )
    activation = _present(config, "activation_function", origin, default="gelu_new")
    _need(
        activation in ("gelu", "gelu_new", "gelu_pytorch_tanh"),
        origin,
        f"activation_function {activation!r} is not supported",
    )
    d = _int(config, "n_embd", origin)
    return ModelConfig(
        n_layer=_int(config, "n_layer", origin),
        n_head=_int(config, "n_head", origin),
        d_model=d,
        block_size=_int(config, "n_positions", origin),
        vocab_size=_int(config, "vocab_size", origin),
        position="learned",
        norm="layernorm",
        norm_eps=_float(config, "layer_norm_epsilon", origin, default=1e-5),
        mlp="gelu" if activation == "gelu" else "gelu_tanh",
        mlp_hidden=_int(config, "n_inner", origin, default=4 * d),
        tie_embeddings=_bool(config, "tie_word_embeddings", origin, default=True),
        bias=True,
        dropout=0.0,
    )


def _llama_model_config(config: dict, kind: str, origin: str) -> ModelConfig:
    """Llama (and SmolLM2), Mistral, Qwen2, Qwen3 and Phi-3: RoPE, RMSNorm, SwiGLU, grouped-query
    attention; Qwen2's biases on q, k and v; Qwen3's QK-norm."""
    hidden_act = _present(config, "hidden_act", origin, default="silu")
    _need(hidden_act == "silu", origin, f"hidden_act {hidden_act!r} is not supported (silu only)")
    n_head, d = _int(config, "num_attention_heads", origin), _int(config, "hidden_size", origin)
    head_dim = None if config.get("head_dim") is None else _int(config, "head_dim", origin)
    block_size = _int(config, "max_position_embeddings", origin)
    return ModelConfig(
        n_layer=_int(config, "num_hidden_layers", origin),
        n_head=n_head,
        n_kv_head=_int(config, "num_key_value_heads", origin, default=n_head),
        d_model=d,
        head_dim=None if head_dim is None or head_dim * n_head == d else head_dim,
        block_size=block_size,
        vocab_size=_int(config, "vocab_size", origin),
        position="rope",
        **_rope_fields(config, kind, origin),
        sliding_window=_sliding_window(config, kind, block_size, origin=origin),
        norm="rmsnorm",
        norm_eps=_float(config, "rms_norm_eps", origin, default=1e-6),
        mlp="swiglu",
        mlp_hidden=_int(config, "intermediate_size", origin),
        qk_norm=kind == "qwen3",
        qkv_bias=kind == "qwen2",  # Qwen2 always has them; `from_hf` drops other biases that are all zero
        tie_embeddings=_bool(config, "tie_word_embeddings", origin, default=False),
        bias=True,
        dropout=0.0,
    )


# The families whose attention reads `sliding_window` on every layer (Llama's ignores the key; Qwen's
# read it only with use_sliding_window, on the layers from max_window_layers on)
WINDOW_ON_EVERY_LAYER = ("mistral", "phi3")


def _sliding_window(config: dict, kind: str, block_size: int, *, origin: str) -> int | None:
    """The window every layer attends within, or None for full attention (also when the window spans
    the whole context); a window on some layers only is refused."""
    # a config.json without the key gets transformers' default: Mistral's is 4096
    window = config.get("sliding_window", 4096 if kind == "mistral" else None)
    window = None if window is None else _int({"sliding_window": window}, "sliding_window", origin)
    layer_types = config.get("layer_types")  # transformers 5: one attention kind per layer
    if layer_types is not None:
        _need(
            isinstance(layer_types, list) and len(set(map(str, layer_types))) == 1,
            origin,
            f"layer_types {layer_types!r} mixes attention kinds across layers (not supported)",
        )
        _need(
            layer_types[0] in ("full_attention", "sliding_attention"),
            origin,
            f"layer_types {layer_types[0]!r} is not supported",
        )
    if kind in WINDOW_ON_EVERY_LAYER:
        used = window is not None and layer_types != ["full_attention"] * len(layer_types or [])
    elif kind in ("qwen2", "qwen3") and _bool(config, "use_sliding_window", origin, default=False):
        first = _present(config, "max_window_layers", origin, default=0)
        _need(first == 0, origin, f"use_sliding_window with max_window_layers {first!r} is not supported")
        used = window is not None
    else:
        used = False
    return window if used and window < block_size else None


# the keys each supported rope type takes, beside rope_type (or type), rope_theta and partial_rotary_factor
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_parameters(config: dict, origin: str) -> dict:
    """RoPE's settings in either spelling: `rope_parameters` (transformers 5), or the top-level
    `rope_theta` and `rope_scaling` of earlier versions; a key both give must agree."""
    merged: dict = {}
    named: dict[str, str] = {}  # key → where merged's value was given, for the error
    for source, params in [
        ("rope_theta", {"rope_theta": config["rope_theta"]} if config.get("rope_theta") is not None else {}),
        ("rope_scaling", config.get("rope_scaling") or {}),
        ("rope_parameters", config.get("rope_parameters") or {}),
    ]:
        if not isinstance(params, dict):
            raise LmforgeError(f"{origin}: {source} must be an object; got {params!r}")
        params = dict(params)
        if "type" in params:  # the older name of rope_type
            params.setdefault("rope_type", params.pop("type"))
        for key, value in params.items():
            _need(
                merged.get(key, value) == value,
                origin,
                f"{source}.{key} {value!r} disagrees with {named.get(key)} {merged.get(key)!r}",
            )
            merged[key] = value
            named[key] = key if source == "rope_theta" else f"{source}.{key}"
    return merged


def _rope_fields(config: dict, kind: str, origin: str) -> dict:
    """ModelConfig's rope_* fields; a rope type or key lmforge does not compute exactly is refused by name."""
    params = _rope_parameters(config, origin)
    rope_type = params.get("rope_type", "default")
    _need(
        rope_type in ROPE_TYPES,
        origin,
        f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})",
    )
    for key in params:
        _need(
            key in ("rope_type", "rope_theta", "partial_rotary_factor", *ROPE_TYPES[rope_type]),
            origin,
            f"rope_parameters.{key} is not supported with rope type {rope_type!r}",
        )
    for where, factor in [
        ("rope_parameters.", params.get("partial_rotary_factor", 1.0)),
        ("", config.get("partial_rotary_factor", 1.0)),
    ]:
        _need(
            factor == 1 and not isinstance(factor, bool),
            origin,
            f"{where}partial_rotary_factor {factor!r} is not supported (RoPE on every channel only)",
        )
    fields = {
        "rope_theta": _float(
            params, "rope_theta", origin, default=HF_DEFAULT_ROPE_THETA, label="rope_parameters."
        )
    }
    if rope_type == "default":
        return fields
    fields |= {
        "rope_scaling": rope_type,
        "rope_factor": _float(params, "factor", origin, label="rope_parameters."),
    }
    if rope_type == "llama3":
        fields |= {
            "rope_low_freq_factor": _float(params, "low_freq_factor", origin, label="rope_parameters."),
            "rope_high_freq_factor": _float(params, "high_freq_factor", origin, label="rope_parameters."),
            "rope_original_context": _int(params, "original_max_position_embeddings", origin),
        }
    return fields


def from_hf(tensors: Tensors, m: ModelConfig, kind: str, *, origin: str) -> tuple[Tensors, ModelConfig]:
    """HF tensors → lmforge state dict, and `m` with bias False when the folder has no non-zero bias
    (but Qwen2's q, k, v biases, which its architecture always has)."""
    family = "gpt2" if kind == "gpt2" else ("qwen3" if kind == "qwen3" else "llama")
    if kind in gemma.MODEL_TYPES:
        family = kind
    tensors = _canonical_names(tensors, family)
    layers = _layer_count(tensors)
    _need(
        layers in (0, m.n_layer),  # 0: no layer at all, reported below as missing tensors
        origin,
        f"config.json has {m.n_layer} layers, the weights {layers}",
    )
    try:  # a tensor of the wrong shape fails in torch.cat, split or .t() before load_state_dict can name it
        if kind == "phi3":
            tensors = _unfuse_phi3(tensors, m)
        take = _Taker(tensors)
        if family in gemma.MODEL_TYPES:
            state = gemma.from_hf(take, m)
        else:
            state = _gpt2_from_hf(take, m) if family == "gpt2" else _llama_from_hf(take, m, family)
    except RuntimeError as exc:
        raise LmforgeError(f"{origin}: tensors do not fit config.json ({str(exc).splitlines()[0]})") from None
    if m.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    else:
        state["head.weight"] = take("lm_head.weight")
    if take.missing:
        missing = take.missing
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise LmforgeError(f"{origin}: missing tensors {shown}")
    # biases the architecture has even where they are zero: Qwen2's on q, k and v
    kept = [k for k in state if m.qkv_bias and k.endswith("attn.qkv.bias")]
    biases = [k for k in state if k.endswith(".bias") and k not in kept]
    m = dataclasses.replace(m, bias=any(bool(state[k].any()) for k in biases))
    if m.bias:
        m = dataclasses.replace(m, qkv_bias=False)  # bias covers them
    else:
        for k in biases:
            del state[k]
    return state, m


def _unfuse_phi3(tensors: Tensors, m: ModelConfig) -> Tensors:
    """Phi-3's fused qkv_proj and gate_up_proj under Llama's names (q, k, v rows in that order; gate
    rows before up rows, as Phi-3's MLP chunks them), for the one Llama path to read."""
    hd = head_size(m)
    sizes = [m.n_head * hd, (m.n_kv_head or m.n_head) * hd, (m.n_kv_head or m.n_head) * hd]
    out: Tensors = {}
    for name, tensor in tensors.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes)):
                out[f"{prefix}{part}.weight"] = rows
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            gate, up = tensor.split(m.mlp_hidden)
            out[f"{prefix}gate_proj.weight"], out[f"{prefix}up_proj.weight"] = gate, up
        else:
            out[name] = tensor
    return out


def _canonical_names(tensors: Tensors, family: str) -> Tensors:
    """Names as `transformers` saves them: without DDP's `module.`, GPT-2's under `transformer.`."""
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if family == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
        tensors = {"transformer." + k if not k.startswith("lm_head") else k: v for k, v in tensors.items()}
    return tensors


def _layer_count(tensors: Tensors) -> int:
    """Number of distinct block indices among the names (`model.layers.N.` or `transformer.h.N.`)."""
    return len({match.group(1) for name in tensors if (match := LAYER_NAME.match(name))})


class _Taker:
    """Takes tensors by HF name, noting the missing ones so that one error lists them all."""

    def __init__(self, tensors: Tensors) -> None:
        self.tensors = tensors
        self.missing: list[str] = []

    def __call__(self, name: str, default: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        if default is not None:
            return default()
        self.missing.append(name)
        return torch.empty(0)


def _zeros(n: int) -> Callable[[], torch.Tensor]:
    """The default of a bias the folder leaves out."""
    return lambda: torch.zeros(n)


def _gpt2_from_hf(take: _Taker, m: ModelConfig) -> Tensors:
    d = m.d_model
    state = {
        "embed.weight": take("transformer.wte.weight"),
        "pos_embed.weight": take("transformer.wpe.weight"),
    }
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in GPT2_NORMS:
            state[b + ours + ".weight"] = take(h + theirs + ".weight")
            state[b + ours + ".bias"] = take(h + theirs + ".bias", _zeros(d))
        for ours, theirs in GPT2_LINEARS:
            weight = take(h + theirs + ".weight")
            state[b + ours + ".weight"] = weight.t().contiguous()
            state[b + ours + ".bias"] = take(
                h + theirs + ".bias", _zeros(weight.shape[-1] if weight.dim() == 2 else 0)
            )
    state["norm.weight"] = take("transformer.ln_f.weight")
    state["norm.bias"] = take("transformer.ln_f.bias", _zeros(d))
    return state


def _llama_from_hf(take: _Taker, m: ModelConfig, family: str) -> Tensors:
    state = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(m.n_layer):
        state.update(_llama_layer_from_hf(take, m, family, b=f"blocks.{i}.", p=f"model.layers.{i}."))
    state["norm.weight"] = take("model.norm.weight")
    return state


def _llama_layer_from_hf(take: _Taker, m: ModelConfig, family: str, *, b: str, p: str) -> Tensors:
    """One block: Llama's separate projections fused into lmforge's qkv and gate+up matrices."""
    d, hd = m.d_model, head_size(m)
    q_size, kv_size = m.n_head * hd, (m.n_kv_head or m.n_head) * hd
    hidden = m.mlp_hidden
    state = {
        b + "norm1.weight": take(p + "input_layernorm.weight"),
        b + "norm2.weight": take(p + "post_attention_layernorm.weight"),
    }
    if family == "qwen3":
        state[b + "attn.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
        state[b + "attn.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
    parts = [("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)]
    state[b + "attn.qkv.weight"] = torch.cat([take(p + f"self_attn.{n}.weight") for n, _ in parts])
    state[b + "attn.qkv.bias"] = torch.cat([take(p + f"self_attn.{n}.bias", _zeros(s)) for n, s in parts])
    state[b + "attn.proj.weight"] = take(p + "self_attn.o_proj.weight")
    state[b + "attn.proj.bias"] = take(p + "self_attn.o_proj.bias", _zeros(d))
    state[b + "mlp.up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
    state[b + "mlp.up.bias"] = torch.cat(
        [take(p + "mlp.gate_proj.bias", _zeros(hidden)), take(p + "mlp.up_proj.bias", _zeros(hidden))]
    )
    state[b + "mlp.down.weight"] = take(p + "mlp.down_proj.weight")
    state[b + "mlp.down.bias"] = take(p + "mlp.down_proj.bias", _zeros(d))
    return state


# ----------------------------------------------------------------------------- commands


def export_checkpoint(
    target: Path,
    out: Path,
    which: str = "best",
    *,
    dtype: str = "fp32",
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """`lmforge export`: write an HF model folder for a run's checkpoint, its weights in `dtype`."""
    from lmforge.data.tokenizer import eot_id
    from lmforge.inference import load
    from lmforge.runtime import DTYPES

    inputs = [target] if which in ("best", "last") else [target, Path(which)]
    check_out(out, "export", overwrite, inputs=inputs)
    # its dtype (auto resolved) is that of the files written
    session = load(target, which, "cpu", dtype=dtype)
    m = session.config.model
    family = hf_family(m)  # refuse before writing anything
    state = {k: v.detach() for k, v in session.model.state_dict().items()}
    torch_dtype = DTYPES[session.dtype]
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in to_hf(state, m, family).items()}
    eot = eot_id(session.tokenizer)
    # the session's end ids (an imported model's own, else <|endoftext|>): what `generate` stops at
    ends = session.end_ids
    # the bos token the exported tokenizer names (an imported model's own, e.g. <s>), else <|endoftext|>
    bos_text = session.template.special_tokens.get("bos_token")
    bos = session.tokenizer.token_to_id(bos_text) if bos_text is not None else None
    special_ids = {
        "bos_token_id": eot if bos is None else bos,
        "eos_token_id": ends[0] if len(ends) == 1 else list(ends) or None,
    }
    with staged_folder(out, "export", overwrite, inputs=[*inputs, session.checkpoint]) as staging:
        files = save_shards(tensors, staging, max_shard_bytes)
        _write_json(
            staging / "config.json",
            hf_config(m, family, eot, dtype=str(torch_dtype).removeprefix("torch.")) | special_ids,
        )
        _write_json(staging / GENERATION_CONFIG, {**special_ids, "do_sample": False})
        shutil.copyfile(session.tokenizer_file, staging / "tokenizer.json")
        # the chat template that `lmforge chat` would use
        for name, content in tokenizer_files(eot, m.block_size, session.template).items():
            _write_json(staging / name, content)
        (staging / "README.md").write_text(_model_card(session, family, files))
    return out


def import_folder(folder: Path, out: Path, overwrite: bool = False) -> Path:
    """`lmforge import`: turn a local HF folder into an lmforge run with one checkpoint."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config
    from lmforge.model.gpt import GPT

    hf = read_hf_config(folder)
    m = model_config_from_hf(hf, str(folder / "config.json"))
    tokenizer = read_hf_tokenizer(folder)
    for name in (TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, GENERATION_CONFIG):  # read below: regular files
        if (folder / name).exists() or (folder / name).is_symlink():  # inside the folder only
            folder_file(folder, name, str(folder))
    # without a template of its own, lmforge's default with the model's own special tokens: its turns
    # then end with the eos_token, and export gives that back to transformers' tokenizer
    template = ChatTemplate.find(folder) or ChatTemplate.default(tokenizer, special_tokens_of(folder))
    end_ids = hf_end_ids(folder, hf, m.vocab_size)  # (): a completion ends at <|endoftext|>, if any
    check_out(out, "import", overwrite, inputs=[folder])
    state, m = from_hf(read_hf_weights(folder), m, hf["model_type"], origin=str(folder))
    model = GPT(m)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LmforgeError(
            f"{folder}: tensors do not fit config.json ({str(exc).splitlines()[-1].strip()})"
        ) from None
    with staged_folder(out, "import", overwrite, inputs=[folder]) as staging:
        config = Config(model=m)
        (staging / "config.toml").write_text(config.to_toml())
        shutil.copyfile(folder / "tokenizer.json", staging / "tokenizer.json")
        save_checkpoint(
            staging,
            0,
            model,
            state={"imported_from": str(folder.resolve())},
            config=config,
            tokenizer_file=folder / "tokenizer.json",
            val_loss=None,
            chat_template=template,
            end_ids=end_ids,
        )
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _privacy_line(privacy: dict | None) -> str:
    """The model card's statement of a differentially private run's guarantee (from meta.json)."""
    if not privacy:
        return "- differential privacy: none (epsilon = infinity)\n"
    return (
        f"- differential privacy: (epsilon = {privacy['epsilon']:.3f}, delta = {privacy['delta']:g}) DP-SGD "
        f"after {privacy['steps']} steps (noise multiplier {privacy['noise_multiplier']:.4f}, per-sample "
        f"clip {privacy['max_grad_norm']:g}, Poisson sample rate {privacy['sample_rate']:.3g}, "
        f"{privacy['accountant'].upper()} accountant); unit of privacy: {privacy['unit']}\n"
    )


def _model_card(session: InferenceSession, family: str, files: list[str]) -> str:
    config = session.config
    meta = json.loads((session.checkpoint / "meta.json").read_text())
    data_meta = Path(config.data.dir) / "meta.json" if config.data.dir else None
    source = (
        json.loads(data_meta.read_text()).get("source") if data_meta and data_meta.is_file() else "unknown"
    )
    val = f"{meta['val_loss']:.4f}" if meta.get("val_loss") is not None else "not evaluated at this step"
    architecture = hf_config(config.model, family, None, dtype="float32")["architectures"][0]
    return (
        f"# lmforge model ({family})\n\nTrained with lmforge and exported as a "
        f"standard `transformers` {architecture}.\n\n"
        f"- training data: {source} (prepared in `{config.data.dir or 'n/a'}`)\n"
        f"- steps: {session.step}\n- validation loss at this checkpoint: {val}\n"
        f"- parameters: {session.model.num_params():,}\n- weights: {', '.join(files)}\n"
        f"{_privacy_line(meta.get('privacy'))}\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n\n'
        f"## Training config\n\n```toml\n{config.to_toml()}```\n"
    )
