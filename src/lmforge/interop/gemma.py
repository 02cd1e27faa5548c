"""Gemma 2 and Gemma 3 (text) ⇄ lmforge: Gemma2ForCausalLM and Gemma3ForCausalLM folders.

What the families compute, each one an lmforge model option (config.py), so that nothing is
approximated: GeGLU MLPs with the tanh GELU (`mlp = "geglu"`); RMSNorm scaling by (1 + weight)
in fp32 (`norm = "rmsnorm1p"`: the weights are copied as they are, both ways); a norm before
and after attention and the MLP (`post_norms`); embeddings times sqrt(hidden_size)
(`embed_scale`); scores scaled by query_pre_attn_scalar (`attn_scale_dim`); soft-capped
attention scores (Gemma 2, `attn_softcap`) and logits (`logit_softcap`); local sliding-window
layers alternating with global ones (`sliding_window`, `global_every`); and in Gemma 3
QK-norm and a RoPE base of its own for the local layers (`rope_local_theta`), with linear
scaling on the global ones (`rope_scaling = "linear"`, `rope_factor`). Both spellings of the RoPE settings are
read: `rope_parameters` (transformers 5) and rope_theta / rope_local_base_freq / rope_scaling.
hf.py reads and writes the folders; this module maps the names and the configuration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.config import ModelConfig, head_size
from lmforge.errors import LmforgeError
from lmforge.interop.keys import need, present, read_bool, read_float, read_int
from lmforge.model.gpt import is_local_layer, mlp_hidden_size

Tensors = dict[str, torch.Tensor]
MODEL_TYPES = ("gemma2", "gemma3_text")
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
MULTIMODAL = "gemma3"  # Gemma3ForConditionalGeneration: the text model behind a vision tower
ACTIVATION = "gelu_pytorch_tanh"
SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' defaults for what a config.json may leave out (Gemma2Config, Gemma3TextConfig):
# read as transformers reads them, so that a short config.json (the text_config of a multimodal
# Gemma 3 names only what differs) builds the model that transformers builds.
SIZES = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
DEFAULTS: dict[str, dict] = {
    "gemma2": {
        **SIZES,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "rope_theta": 10000.0,
        "global_every": 2,  # every other layer global, the first local
    },
    "gemma3_text": {
        **SIZES,
        "vocab_size": 262_208,
        "max_position_embeddings": 131_072,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "global_every": 6,  # sliding_window_pattern: five local layers, then a global one
    },
}
ROPE_KEYS = ("rope_type", "type", "rope_theta", "factor", "partial_rotary_factor")


# ----------------------------------------------------------------------------- import


def model_config(config: dict, origin: str) -> ModelConfig:
    """ModelConfig of a Gemma 2 or Gemma 3 text config.json; one-line errors for what lmforge cannot
    compute exactly as transformers does."""
    kind = config.get("model_type")
    need(
        kind != MULTIMODAL,
        origin,
        f"model_type {MULTIMODAL!r} (Gemma 3 with a vision tower, Gemma3ForConditionalGeneration) is not "
        "supported: lmforge imports text-only Gemma 3 (Gemma3ForCausalLM, model_type 'gemma3_text')",
    )
    _check_fixed(config, kind, origin)

    def size(key: str) -> int:
        return read_int(config, key, origin, default=DEFAULTS[kind][key])

    n_layer = size("num_hidden_layers")
    window, global_every = _layers(config, kind, n_layer=n_layer, origin=origin)
    theta, local_theta, factor = _rope(config, kind, origin)
    return ModelConfig(
        n_layer=n_layer,
        n_head=size("num_attention_heads"),
        n_kv_head=size("num_key_value_heads"),
        head_dim=size("head_dim"),
        d_model=size("hidden_size"),
        block_size=size("max_position_embeddings"),
        vocab_size=size("vocab_size"),
        position="rope",
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling="none" if factor == 1 else "linear",
        rope_factor=factor,
        norm="rmsnorm1p",
        norm_eps=read_float(config, "rms_norm_eps", origin, default=1e-6),
        mlp="geglu",
        mlp_hidden=size("intermediate_size"),
        qk_norm=kind == "gemma3_text",
        post_norms=True,
        embed_scale=True,
        attn_scale_dim=size("query_pre_attn_scalar"),
        attn_softcap=_cap(config, "attn_logit_softcapping", kind=kind, origin=origin),
        logit_softcap=_cap(config, "final_logit_softcapping", kind=kind, origin=origin),
        sliding_window=window,
        global_every=global_every,
        tie_embeddings=read_bool(config, "tie_word_embeddings", origin, default=True),
        bias=False,
        dropout=0.0,
    )


def _check_fixed(config: dict, kind: str, origin: str) -> None:
    """The settings that published Gemma checkpoints share and lmforge computes only one way."""
    activation = present(config, "hidden_activation", origin, default=ACTIVATION)
    need(
        activation == ACTIVATION,
        origin,
        f"hidden_activation {activation!r} is not supported ({ACTIVATION!r} only)",
    )
    need(
        not read_bool(config, "attention_bias", origin, default=False),
        origin,
        "attention_bias = true is not supported (Gemma's projections have no biases)",
    )
    need(
        not read_bool(config, "use_bidirectional_attention", origin, default=False),
        origin,
        "use_bidirectional_attention = true is not supported (a causal language model only)",
    )
    if kind == "gemma3_text":  # transformers' Gemma 3 reads the key and never applies it
        need(
            config.get("attn_logit_softcapping") is None,
            origin,
            "attn_logit_softcapping is not supported for Gemma 3 (transformers' Gemma 3 ignores it)",
        )


def _cap(config: dict, key: str, *, kind: str, origin: str) -> float | None:
    """A soft-cap: null is none, a missing key transformers' default."""
    value = config[key] if key in config else DEFAULTS[kind][key]
    return None if value is None else read_float({key: value}, key, origin)


def _layers(config: dict, kind: str, *, n_layer: int, origin: str) -> tuple[int | None, int]:
    """(sliding_window, global_every) from `layer_types` (transformers 5) or the period of the global
    layers (Gemma 3's sliding_window_pattern; 2 in Gemma 2). (None, 0) when every layer is global."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        every = DEFAULTS[kind]["global_every"]
        if kind == "gemma3_text":
            every = read_int(config, "sliding_window_pattern", origin, default=every)
        layer_types = [SLIDING if (i + 1) % every else FULL for i in range(n_layer)]
    need(
        isinstance(layer_types, list)
        and len(layer_types) == n_layer
        and all(t in (SLIDING, FULL) for t in layer_types),
        origin,
        f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {n_layer} layers",
    )
    if SLIDING not in layer_types:
        return None, 0
    global_every = layer_types.index(FULL) + 1 if FULL in layer_types else 0
    periodic = [SLIDING if global_every == 0 or (i + 1) % global_every else FULL for i in range(n_layer)]
    need(
        layer_types == periodic,
        origin,
        "layer_types is not supported: lmforge's global layers come every Nth layer (model.global_every)",
    )
    return read_int(config, "sliding_window", origin, default=DEFAULTS[kind]["sliding_window"]), global_every


def _rope(config: dict, kind: str, origin: str) -> tuple[float, float | None, float]:
    """(rope_theta, rope_local_theta, the linear factor) from `rope_parameters` (transformers 5, one set
    per layer type in Gemma 3), else from rope_theta, rope_local_base_freq and rope_scaling; where both
    spellings are present they must agree. Gemma 2 has one set for every layer, and no scaling."""
    legacy = _legacy_rope(config, kind, origin)
    params = config.get("rope_parameters")
    if params is None:
        rope = legacy
    elif kind == "gemma2":
        theta, factor = _rope_set(params, origin, label="rope_parameters.", default_theta=legacy[0])
        rope = (theta, None, factor)
    else:
        need(
            isinstance(params, dict) and set(params) <= {FULL, SLIDING},
            origin,
            f"rope_parameters must be an object of {FULL!r} and {SLIDING!r}; got {params!r}",
        )
        theta, factor = _rope_set(
            params.get(FULL, {}), origin, label=f"rope_parameters.{FULL}.", default_theta=legacy[0]
        )
        local, local_factor = _rope_set(
            params.get(SLIDING, {}), origin, label=f"rope_parameters.{SLIDING}.", default_theta=legacy[1]
        )
        need(local_factor == 1, origin, f"rope_parameters.{SLIDING}: RoPE scaling is not supported there")
        rope = (theta, local, factor)
    given = any(config.get(key) is not None for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"))
    need(
        params is None or not given or rope == legacy,
        origin,
        f"rope_theta / rope_local_base_freq / rope_scaling {legacy} disagree with rope_parameters {rope}",
    )
    need(kind != "gemma2" or rope[2] == 1, origin, "RoPE scaling is not supported for Gemma 2")
    return rope


def _legacy_rope(config: dict, kind: str, origin: str) -> tuple[float, float | None, float]:
    """The RoPE settings as written before transformers 5 (or their defaults)."""
    theta = read_float(config, "rope_theta", origin, default=DEFAULTS[kind]["rope_theta"])
    local = None
    if kind == "gemma3_text":
        local_default = DEFAULTS[kind]["rope_local_base_freq"]
        local = read_float(config, "rope_local_base_freq", origin, default=local_default)
    scaling = config.get("rope_scaling")
    factor = 1.0
    if scaling is not None:
        _, factor = _rope_set(scaling, origin, label="rope_scaling.", default_theta=theta)
    return theta, local, factor


def _rope_set(params: object, origin: str, *, label: str, default_theta: float) -> tuple[float, float]:
    """(theta, linear factor) of one set of RoPE settings: plain (`default`) or `linear` only."""
    need(isinstance(params, dict), origin, f"{label.rstrip('.')} must be an object; got {params!r}")
    for key in params:
        need(key in ROPE_KEYS, origin, f"{label}{key} is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    need(
        rope_type in ("default", "linear"),
        origin,
        f"{label}rope_type {rope_type!r} is not supported (default or linear only)",
    )
    partial = params.get("partial_rotary_factor", 1.0)
    need(
        partial == 1 and not isinstance(partial, bool),
        origin,
        f"{label}partial_rotary_factor {partial!r} is not supported (RoPE on every channel only)",
    )
    theta = read_float(params, "rope_theta", origin, default=default_theta, label=label)
    factor = read_float(params, "factor", origin, label=label) if rope_type == "linear" else 1.0
    need(factor >= 1, origin, f"{label}factor must be >= 1; got {factor}")
    return theta, factor


def from_hf(take: Callable[[str], torch.Tensor], m: ModelConfig) -> Tensors:
    """lmforge's state dict from Gemma tensors, read through hf.py's `take` (which notes the missing
    ones): separate projections fused into qkv and gate+up, the four norms of each layer by role."""
    state = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(m.n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _norms(m):
            state[b + ours + ".weight"] = take(p + theirs + ".weight")
        state[b + "attn.qkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        state[b + "attn.proj.weight"] = take(p + "self_attn.o_proj.weight")
        gate_up = [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
        state[b + "mlp.up.weight"] = torch.cat(gate_up)
        state[b + "mlp.down.weight"] = take(p + "mlp.down_proj.weight")
    state["norm.weight"] = take("model.norm.weight")
    return state


def _norms(m: ModelConfig) -> list[tuple[str, str]]:
    """(lmforge, Gemma) names of a layer's norms. Gemma's post_attention_layernorm norms attention's
    output, where Llama's of the same name norms the MLP's input."""
    norms = [
        ("norm1", "input_layernorm"),
        ("post_attn_norm", "post_attention_layernorm"),
        ("norm2", "pre_feedforward_layernorm"),
        ("post_mlp_norm", "post_feedforward_layernorm"),
    ]
    if m.qk_norm:
        norms += [("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm")]
    return norms


# ----------------------------------------------------------------------------- export


def gemma_family(m: ModelConfig) -> str | None:
    """gemma2 or gemma3_text (by QK-norm) for a model that uses Gemma's options, once it has every one
    that Gemma's transformers classes compute; None for a model that uses none of them."""
    options = {
        "norm": m.norm == "rmsnorm1p",
        "mlp": m.mlp == "geglu",
        "post_norms": m.post_norms,
        "embed_scale": m.embed_scale,
        "attn_scale_dim": m.attn_scale_dim is not None,
        "attn_softcap": m.attn_softcap is not None,
        "global_every": m.global_every != 0,
        "rope_local_theta": m.rope_local_theta is not None,
    }
    used = [name for name, set_ in options.items() if set_]
    if not used:
        return None
    need_all = (
        f"model.{used[0]} = {getattr(m, used[0])!r} exports only as Gemma 2 or 3, which need position = "
        "rope, norm = rmsnorm1p, mlp = geglu, post_norms, embed_scale, causal attention and no bias"
    )
    for name, fits in [
        ("position", m.position == "rope"),
        ("norm", m.norm == "rmsnorm1p"),
        ("mlp", m.mlp == "geglu"),
        ("post_norms", m.post_norms),
        ("embed_scale", m.embed_scale),
        ("attention", m.attention == "causal"),
        ("bias", not m.bias),
    ]:
        _fit(m, name, fits=fits, reason=need_all)
    if m.qk_norm:
        _fit(
            m,
            "attn_softcap",
            fits=m.attn_softcap is None,
            reason="Gemma 3, the QK-norm Gemma, has no attention cap",
        )
        _fit(
            m,
            "rope_local_theta",
            fits=m.rope_local_theta is not None or m.rope_scaling == "none" or m.sliding_window is None,
            reason="Gemma 3's local layers never scale RoPE: give them a base of their own beside it",
        )
        _fit(
            m,
            "rope_scaling",
            fits=m.rope_scaling in ("none", "linear"),
            reason="Gemma 3 scales RoPE linearly, if at all",
        )
        return "gemma3_text"
    gemma2 = "Gemma 2, the Gemma without QK-norm, has one RoPE base and no scaling"
    _fit(m, "rope_local_theta", fits=m.rope_local_theta is None, reason=gemma2)
    _fit(m, "rope_scaling", fits=m.rope_scaling == "none", reason=gemma2)
    return "gemma2"


def _fit(m: ModelConfig, option: str, *, fits: bool, reason: str) -> None:
    if not fits:
        value = getattr(m, option)
        raise LmforgeError(f"model.{option} = {value!r} has no standard Hugging Face architecture ({reason})")


def to_hf(state: Tensors, m: ModelConfig) -> Tensors:
    """lmforge state dict → Gemma tensor names (the head, if untied, is hf.py's to add)."""
    hd, hidden = head_size(m), mlp_hidden_size(m)
    q_size, kv_size = m.n_head * hd, (m.n_kv_head or m.n_head) * hd
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(m.n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _norms(m):
            out[p + theirs + ".weight"] = state[b + ours + ".weight"]
        q, k, v = state[b + "attn.qkv.weight"].split([q_size, kv_size, kv_size])
        for name, part in zip("qkv", (q, k, v)):
            out[p + f"self_attn.{name}_proj.weight"] = part.contiguous()
        out[p + "self_attn.o_proj.weight"] = state[b + "attn.proj.weight"]
        gate, up = state[b + "mlp.up.weight"].split(hidden)
        out[p + "mlp.gate_proj.weight"] = gate.contiguous()
        out[p + "mlp.up_proj.weight"] = up.contiguous()
        out[p + "mlp.down_proj.weight"] = state[b + "mlp.down.weight"]
    out["model.norm.weight"] = state["norm.weight"]
    return out


def hf_config(m: ModelConfig, family: str, eot_id: int | None, *, dtype: str) -> dict:
    """The config.json of Gemma2ForCausalLM or Gemma3ForCausalLM that computes `m`. RoPE is written in
    the spelling every transformers version reads (rope_theta, ...), and the layers as layer_types."""
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": mlp_hidden_size(m),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": head_size(m),
        "hidden_activation": ACTIVATION,
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "query_pre_attn_scalar": m.attn_scale_dim or head_size(m),
        "final_logit_softcapping": m.logit_softcap,
        "attn_logit_softcapping": m.attn_softcap,
        # a window spanning the context where no layer slides: transformers builds the local mask anyway
        "sliding_window": m.sliding_window or m.block_size,
        "layer_types": [SLIDING if is_local_layer(m, i) else FULL for i in range(m.n_layer)],
        "rope_theta": m.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if family == "gemma3_text":
        config["rope_local_base_freq"] = m.rope_local_theta or m.rope_theta
        if m.rope_scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": m.rope_factor}
    return config
