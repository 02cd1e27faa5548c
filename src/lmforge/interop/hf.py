"""Hugging Face interop: lmforge checkpoints ⇄ standard `transformers` model folders.

Architectures (no custom code on either side):
    RoPE + RMSNorm + SwiGLU             ⇄ LlamaForCausalLM (also read: Mistral, Qwen2)
    RoPE + RMSNorm + SwiGLU + QK-norm   ⇄ Qwen3ForCausalLM
    learned positions + LayerNorm + GELU ⇄ GPT2LMHeadModel
Any other option combination is refused by name rather than written as a folder that would
load with wrong outputs. Nothing here imports `transformers`: the files are written and read
directly, so export and import work without the `hf` extra (the tests check them with it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.gpt import mlp_hidden_size
from lmforge.staging import check_out, staged_folder

if TYPE_CHECKING:
    from lmforge.checkpoint import LoadedCheckpoint

EOT = "<|endoftext|>"
Tensors = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- export


def hf_family(m: ModelConfig) -> str:
    """The HF family that expresses this architecture exactly: llama, qwen3 or gpt2."""

    def refuse(option: str, value: object, need: str) -> LmforgeError:
        return LmforgeError(f"model.{option} = {value!r} has no standard Hugging Face architecture ({need})")

    if m.logit_softcap is not None:
        raise refuse("logit_softcap", m.logit_softcap, "Llama, Qwen3 and GPT-2 have no logit soft-capping")
    if m.position == "rope":
        need = "RoPE models export as Llama/Qwen3, which need norm = rmsnorm and mlp = swiglu"
        if m.norm != "rmsnorm":
            raise refuse("norm", m.norm, need)
        if m.mlp != "swiglu":
            raise refuse("mlp", m.mlp, need)
        if m.qk_norm and m.bias:
            raise refuse("bias", m.bias, "Qwen3, the QK-norm architecture, has no MLP biases")
        return "qwen3" if m.qk_norm else "llama"
    need = (
        "learned positions export as GPT-2, which needs norm = layernorm, mlp = gelu or gelu_tanh, "
        "no GQA, no QK-norm"
    )
    if m.norm != "layernorm":
        raise refuse("norm", m.norm, need)
    if m.mlp not in ("gelu", "gelu_tanh"):
        raise refuse("mlp", m.mlp, need)
    if m.n_kv_head not in (None, m.n_head):
        raise refuse("n_kv_head", m.n_kv_head, need)
    if m.qk_norm:
        raise refuse("qk_norm", m.qk_norm, need)
    return "gpt2"


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
        out.update(_llama_layer_to_hf(state, m, family, f"blocks.{i}.", f"model.layers.{i}."))
    out["model.norm.weight"] = state["norm.weight"]
    return out


def _llama_layer_to_hf(state: Tensors, m: ModelConfig, family: str, b: str, p: str) -> Tensors:
    """One block: lmforge's fused qkv and gate+up matrices become Llama's separate projections."""
    hd = m.d_model // m.n_head
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
        if m.bias:
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


def hf_config(m: ModelConfig, family: str, eot_id: int | None, dtype: str) -> dict:
    """The config.json of `family` that describes this model exactly."""
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
        "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"],
        "model_type": family,
        "hidden_size": m.d_model,
        "intermediate_size": mlp_hidden_size(m),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": m.d_model // m.n_head,
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "hidden_act": "silu",
        "attention_bias": m.bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        **common,
    }
    if family == "llama":
        config["mlp_bias"] = m.bias
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layer)
    return config


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


def tokenizer_files(eot_id: int | None, block_size: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json, so AutoTokenizer loads tokenizer.json."""
    specials = {"bos_token": EOT, "eos_token": EOT} if eot_id is not None else {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


# ----------------------------------------------------------------------------- import

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def read_hf_weights(folder: Path) -> Tensors:
    """Single or sharded safetensors, else pytorch_model.bin loaded with weights_only=True."""
    for index_name, loader in [
        ("model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin.index.json", _load_bin),
    ]:
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors: Tensors = {}
            for file in sorted(set(weight_map.values())):
                tensors.update(loader(folder / file))
            return tensors
    if (folder / "model.safetensors").is_file():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise LmforgeError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


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
    """ModelConfig from a config.json of a supported family; refuses what lmforge cannot express."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise LmforgeError(
            f"{origin}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    if kind == "gpt2":
        return _gpt2_model_config(config, origin)
    return _llama_model_config(config, kind, origin)


def _get(config: dict, key: str, default: object = None) -> object:
    """config[key], or `default` when the key is missing or null."""
    return config[key] if config.get(key) is not None else default


def _need(condition: bool, origin: str, message: str) -> None:
    if not condition:
        raise LmforgeError(f"{origin}: {message}")


def _gpt2_model_config(config: dict, origin: str) -> ModelConfig:
    _need(
        not _get(config, "scale_attn_by_inverse_layer_idx", False),
        origin,
        "scale_attn_by_inverse_layer_idx is not supported",
    )
    _need(_get(config, "scale_attn_weights", True), origin, "scale_attn_weights = false is not supported")
    activation = _get(config, "activation_function", "gelu_new")
    _need(
        activation in ("gelu", "gelu_new", "gelu_pytorch_tanh"),
        origin,
        f"activation_function {activation!r} is not supported",
    )
    d = int(config["n_embd"])
    return ModelConfig(
        n_layer=int(config["n_layer"]),
        n_head=int(config["n_head"]),
        d_model=d,
        block_size=int(config["n_positions"]),
        vocab_size=int(config["vocab_size"]),
        position="learned",
        norm="layernorm",
        norm_eps=float(_get(config, "layer_norm_epsilon", 1e-5)),
        mlp="gelu" if activation == "gelu" else "gelu_tanh",
        mlp_hidden=int(_get(config, "n_inner", 4 * d)),
        tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
        bias=True,
        dropout=0.0,
    )


def _llama_model_config(config: dict, kind: str, origin: str) -> ModelConfig:
    """Llama, Mistral, Qwen2 and Qwen3: RoPE, RMSNorm, SwiGLU, grouped-query attention."""
    _need(
        _get(config, "hidden_act", "silu") == "silu",
        origin,
        f"hidden_act {config.get('hidden_act')!r} is not supported (silu only)",
    )
    _need(_get(config, "rope_scaling") is None, origin, "rope_scaling is not supported")
    n_head, d = int(config["num_attention_heads"]), int(config["hidden_size"])
    head_dim = int(_get(config, "head_dim", d // n_head))
    _need(
        head_dim * n_head == d,
        origin,
        f"head_dim {head_dim} x {n_head} heads != hidden_size {d} is not supported",
    )
    window = _get(config, "sliding_window")
    uses_window = window is not None and (kind == "mistral" or _get(config, "use_sliding_window", False))
    _need(
        not uses_window or int(window) >= int(config["max_position_embeddings"]),
        origin,
        "sliding-window attention is not supported",
    )
    return ModelConfig(
        n_layer=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(_get(config, "num_key_value_heads", n_head)),
        d_model=d,
        block_size=int(config["max_position_embeddings"]),
        vocab_size=int(config["vocab_size"]),
        position="rope",
        rope_theta=float(_get(config, "rope_theta", 10000.0)),
        norm="rmsnorm",
        norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
        mlp="swiglu",
        mlp_hidden=int(config["intermediate_size"]),
        qk_norm=kind == "qwen3",
        tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        bias=True,
        dropout=0.0,
    )


def from_hf(tensors: Tensors, m: ModelConfig, kind: str, origin: str) -> Tensors:
    """HF tensors → lmforge state dict. Sets `m.bias` False when the folder has no non-zero bias."""
    family = "gpt2" if kind == "gpt2" else ("qwen3" if kind == "qwen3" else "llama")
    take = _Taker(_canonical_names(tensors, family))
    state = _gpt2_from_hf(take, m) if family == "gpt2" else _llama_from_hf(take, m, family)
    if m.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    else:
        state["head.weight"] = take("lm_head.weight")
    if take.missing:
        missing = take.missing
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise LmforgeError(f"{origin}: missing tensors {shown}")
    biases = [k for k in state if k.endswith(".bias")]
    m.bias = any(bool(state[k].any()) for k in biases)
    if not m.bias:
        for k in biases:
            del state[k]
    return state


def _canonical_names(tensors: Tensors, family: str) -> Tensors:
    """Names as `transformers` saves them: without DDP's `module.`, GPT-2's under `transformer.`."""
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if family == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
        tensors = {"transformer." + k if not k.startswith("lm_head") else k: v for k, v in tensors.items()}
    return tensors


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
        state.update(_llama_layer_from_hf(take, m, family, f"blocks.{i}.", f"model.layers.{i}."))
    state["norm.weight"] = take("model.norm.weight")
    return state


def _llama_layer_from_hf(take: _Taker, m: ModelConfig, family: str, b: str, p: str) -> Tensors:
    """One block: Llama's separate projections fused into lmforge's qkv and gate+up matrices."""
    d, hd = m.d_model, m.d_model // m.n_head
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
    dtype: str = "fp32",
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """`lmforge export`: write an HF model folder for a run's checkpoint."""
    from lmforge.checkpoint import load_for_inference
    from lmforge.data.tokenizer import eot_id, load_tokenizer
    from lmforge.runtime import DTYPES

    inputs = [target] if which in ("best", "last") else [target, Path(which)]
    check_out(out, "export", overwrite, inputs)
    loaded = load_for_inference(target, which, torch.device("cpu"))
    m = loaded.config.model
    family = hf_family(m)  # refuse before writing anything
    state = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf(state, m, family).items()}
    eot = eot_id(load_tokenizer(loaded.tokenizer_file))
    with staged_folder(out, "export", overwrite, [*inputs, loaded.path]) as staging:
        files = save_shards(tensors, staging, max_shard_bytes)
        _write_json(
            staging / "config.json",
            hf_config(m, family, eot, str(DTYPES[dtype]).removeprefix("torch.")),
        )
        _write_json(
            staging / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "do_sample": False}
        )
        shutil.copyfile(loaded.tokenizer_file, staging / "tokenizer.json")
        for name, content in tokenizer_files(eot, m.block_size).items():
            _write_json(staging / name, content)
        (staging / "README.md").write_text(_model_card(loaded, family, files))
    return out


def import_folder(folder: Path, out: Path, overwrite: bool = False) -> Path:
    """`lmforge import`: turn a local HF folder into an lmforge run with one checkpoint."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config
    from lmforge.model.gpt import GPT

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{config_path}: not valid JSON ({exc})") from None
    m = model_config_from_hf(hf, str(config_path))
    if not (folder / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder}: no tokenizer.json (lmforge needs the fast-tokenizer file)")
    check_out(out, "import", overwrite, [folder])
    state = from_hf(read_hf_weights(folder), m, hf["model_type"], str(folder))
    model = GPT(m)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LmforgeError(
            f"{folder}: tensors do not fit config.json ({str(exc).splitlines()[-1].strip()})"
        ) from None
    with staged_folder(out, "import", overwrite, [folder]) as staging:
        config = Config(model=m)
        (staging / "config.toml").write_text(config.to_toml())
        shutil.copyfile(folder / "tokenizer.json", staging / "tokenizer.json")
        save_checkpoint(
            staging,
            0,
            model,
            {"imported_from": str(folder.resolve())},
            config,
            folder / "tokenizer.json",
            None,
        )
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _model_card(loaded: LoadedCheckpoint, family: str, files: list[str]) -> str:
    config = loaded.config
    meta = json.loads((loaded.path / "meta.json").read_text())
    data_meta = Path(config.data.dir) / "meta.json" if config.data.dir else None
    source = (
        json.loads(data_meta.read_text()).get("source") if data_meta and data_meta.is_file() else "unknown"
    )
    val = f"{meta['val_loss']:.4f}" if meta.get("val_loss") is not None else "not evaluated at this step"
    return (
        f"# lmforge model ({family})\n\nTrained with lmforge and exported as a "
        f"standard `transformers` {hf_config(config.model, family, None, 'float32')['architectures'][0]}.\n\n"
        f"- training data: {source} (prepared in `{config.data.dir or 'n/a'}`)\n"
        f"- steps: {loaded.step}\n- validation loss at this checkpoint: {val}\n"
        f"- parameters: {loaded.model.num_params():,}\n- weights: {', '.join(files)}\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n\n'
        f"## Training config\n\n```toml\n{config.to_toml()}```\n"
    )
