"""A decoder-only Transformer, top to bottom in one file.

GPT-2's architecture by default (learned positions, LayerNorm, GELU MLP, tied head), with
the modern options behind config switches: RoPE, RMSNorm, SwiGLU / GeGLU / ReLU², grouped-query
attention and QK-norm, and Gemma's: (1 + weight) norms, post-norms, scaled embeddings, attention
soft-capping and sliding-window layers. The output heads (next-token logits, a span head) and their losses are
in heads.py; parallelism, checkpointing and data live outside the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig, head_size
from lmforge.model import cpu_kernels
from lmforge.model.heads import HEADS, Head, HeadOutput, LMHead, head_attribute, word_matches
from lmforge.targets import IGNORE_INDEX


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """The configured norm over the last `dim` channels."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    if config.norm == "rmsnorm1p":
        return OffsetRMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class _FusedRMSNorm(torch.autograd.Function):
    """RMSNorm over the last dimension on the CPU, computed in fp32: lmforge's compiled kernel
    (`cpu_kernels`, one pass over the data each way, no slower than `layer_norm`), else a few
    whole-tensor aten passes.

    PyTorch's CPU `rms_norm` is a chain of small ops (pow, mean, add, rsqrt, mul, mul), each a pass
    over the tensor, and autograd saves three tensors and runs their backward one by one: forward
    plus backward costs several times `layer_norm`'s. Both paths here save only the input and one
    fp32 number per row. The fallback's forward is one reduction and two scaling passes; its
    backward reuses layer_norm's fused kernel, which given a zero mean and the RMS's reciprocal
    computes everything but one term (the derivative of the mean it would subtract), added back
    with a matrix-vector product and one broadcast add: 1.0-2.0x layer_norm (benchmarks/RESULTS.md).
    No op here is on autocast's lists, so no autocast guard (entering one costs ~10 µs, a few
    percent of a speedrun-sized norm); the tests run it under autocast.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, compiled: bool) -> torch.Tensor:
        """`compiled`: the compiled kernel (`cpu_kernels.rms_norm_usable`), else aten passes."""
        ctx.compiled = compiled
        if compiled:
            y, rstd, x = cpu_kernels.rms_norm_forward(x, weight, eps)
        else:
            y, rstd = _rms_norm_passes(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's backward builds no graph of its own
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, rstd, weight = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        if ctx.compiled:
            return (*cpu_kernels.rms_norm_backward(grad, x, weight, rstd=rstd, wanted=wanted), None, None)
        d, acc = x.shape[-1], rstd.dtype
        ga = grad.to(acc).contiguous()  # the same tensor if it already is both
        xa, wa = x.to(acc), weight.to(acc)
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            ga, xa, [d], torch.zeros_like(rstd), rstd, wa, None, [*wanted, False]
        )
        if grad_x is not None:
            # layer_norm's backward subtracts rstd·mean(g·w) (the mean-centring's derivative): add it back
            grad_x = grad_x.add_(torch.mv(ga.view(-1, d), wa).view(rstd.shape).mul_(rstd).div_(d)).to(x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None


def _rms_norm_passes(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd (..., 1)): RMSNorm in aten ops, one reduction and two scaling passes, in fp32 (fp64
    for gradcheck)."""
    d = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    # (..., 1): 1 / sqrt(mean(x²) + eps), the norm in one pass (no x² tensor)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    rstd = norm.square_().div_(d).add_(eps).rsqrt_()
    if x.dtype == weight.dtype == acc:
        return torch.mul(x, rstd).mul_(weight), rstd
    # bf16: the products in fp32, rounded once into the output (no separate cast pass)
    out = torch.empty(x.shape, dtype=x.dtype)
    return torch.mul(torch.mul(x, rstd), weight, out=out), rstd


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and state dict) whose CPU forward and backward are
    `_FusedRMSNorm`'s. Elsewhere, and under `torch.compile` (which fuses the reference itself),
    `F.rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an input of the wrong width goes to F.rms_norm, which raises PyTorch's own error
        fused = x.is_cpu and self.weight is not None and x.shape[-1:] == self.normalized_shape
        if not fused or torch.compiler.is_compiling():
            return self._reference(x)
        eps = self.eps
        if eps is None:  # nn.RMSNorm's default: the epsilon of F.rms_norm's compute type (fp32 for bf16)
            eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        weight = self._weight(x)
        compiled = cpu_kernels.rms_norm_usable(x, weight)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _FusedRMSNorm.apply(x, weight, eps, compiled)
        # inference (a decode step is a few rows): no autograd.Function, ~10 µs less per norm
        return (cpu_kernels.rms_norm_forward if compiled else _rms_norm_passes)(x, weight, eps)[0]

    def _weight(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.weight

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The norm in PyTorch's ops: on a GPU, under torch.compile, or for an input it cannot take."""
        return F.rms_norm(x, self.normalized_shape, self._weight(x), self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) scaled by (1 + weight), computed in fp32 and cast back to x's
    dtype. The weight starts at 0 (the identity scale); a bf16 weight near 0 keeps more precision
    than one near 1, which is why Gemma stores the offset rather than the scale. On the CPU, the
    fused norm with the scale 1 + weight in fp32 (it computes in fp32 and rounds once)."""

    def __init__(self, dim: int, *, eps: float | None = None) -> None:
        # eps None: F.rms_norm's default for the fp32 input below, whatever x's dtype
        super().__init__(dim, eps=torch.finfo(torch.float32).eps if eps is None else eps)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.normalized_shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def _weight(self, x: torch.Tensor) -> torch.Tensor | None:
        return 1.0 + self.weight.float()


def make_head_norm(config: ModelConfig, head_dim: int) -> nn.Module:
    """QK-norm over each head's channels: Gemma's (1 + weight) norm with model.norm = rmsnorm1p."""
    if config.norm == "rmsnorm1p":
        return OffsetRMSNorm(head_dim, eps=config.norm_eps)
    return HeadNorm(head_dim, eps=config.norm_eps)


class HeadNorm(RMSNorm):
    """QK-norm: RMSNorm over each head's channels, its weight cast to the input's dtype (under
    autocast, mixed dtypes miss PyTorch's fused kernels; the CPU kernel gives the same result). A
    module rather than a bare `F.rms_norm`, so that hooks see it (per-sample gradients for
    differential privacy)."""

    def _weight(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(x.dtype)


GATED_MLPS = ("swiglu", "geglu")  # activation(gate) x up: the up-projection is twice as wide


def is_local_layer(config: ModelConfig, layer: int) -> bool:
    """Whether block `layer` (from 0) attends within model.sliding_window rather than to everything."""
    if config.sliding_window is None:
        return False
    return config.global_every == 0 or (layer + 1) % config.global_every != 0


def mlp_hidden_size(config: ModelConfig) -> int:
    """Width of the MLP's hidden layer (of each half for SwiGLU)."""
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    if config.mlp in GATED_MLPS:  # 8/3 d keeps the parameter count of a 4 d GELU MLP
        return 64 * math.ceil(8 * config.d_model / 3 / 64)
    return 4 * config.d_model


def rope_frequencies(config: ModelConfig, *, theta: float | None = None) -> torch.Tensor:
    """(head_dim / 2,): RoPE's angle per position of each pair of channels, scaled by
    config.rope_scaling as Hugging Face's rope_type of the same name scales it. With `theta` (the
    sliding-window layers' own base, model.rope_local_theta) plain, unscaled RoPE at that base."""
    head_dim = head_size(config)
    base = config.rope_theta if theta is None else theta
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if theta is not None:
        return inv_freq
    if config.rope_scaling == "linear":  # positions / factor, the same as frequencies / factor
        return inv_freq / config.rope_factor
    if config.rope_scaling != "llama3":  # dynamic NTK only rescales past block_size, which no input reaches
        return inv_freq
    # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by the
    # factor, those shorter than it / high_freq_factor kept, and the ones between blended smoothly
    context, low, high = (
        config.rope_original_context,
        config.rope_low_freq_factor,
        config.rope_high_freq_factor,
    )
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / config.rope_factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    between = ~(wavelength < context / high) & ~(wavelength > context / low)
    return torch.where(between, blended, scaled)


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half layout (GPT-NeoX, Llama): channel i of
    the first half pairs with channel i of the second half, rotated by a position-dependent angle."""

    def __init__(self, inv_freq: torch.Tensor, max_len: int) -> None:
        """inv_freq (head_dim / 2,): one frequency per pair of channels (`rope_frequencies`)."""
        super().__init__()
        # (max_len, head_dim): channels i and i + head_dim / 2 rotate by the same angle
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, positions: int | torch.Tensor, T: int) -> RotaryTables:
        """The angles of T new tokens at positions start..start+T-1 (`positions` the int start, for
        every row), or at each row's own positions (`positions` (B, T)): looked up once per forward."""
        if isinstance(positions, int):  # (T, 1, head_dim), broadcast over batch and heads
            chosen = slice(positions, positions + T)
            return RotaryTables(self.cos[chosen, None], self.sin[chosen, None])
        # (B, T, 1, head_dim), broadcast over heads
        return RotaryTables(self.cos[positions][:, :, None], self.sin[positions][:, :, None])


class RotaryTables(NamedTuple):
    """cos and sin of one forward's rotation angles, shaped to broadcast over (B, T, heads, head_dim)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, heads, head_dim) rotated to its positions."""
        half = x.size(-1) // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, T, heads, head_dim)
        return x * self.cos.to(x.dtype) + rotated * self.sin.to(x.dtype)


def token_positions(start: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T): the positions of T new tokens in each row, row b's starting at start[b]."""
    return start[:, None] + torch.arange(T, device=start.device)


class CacheStep(NamedTuple):
    """Where one forward's T new tokens go in `cache`, and which keys they see: worked out once per
    forward (`KVCache.step`), for every layer."""

    cache: KVCache
    positions: int | torch.Tensor  # the first new position of every row, or (B, T): each row's own
    end: int  # positions in use once the new tokens are added (the longest row's)
    mask: torch.Tensor | None  # which keys each new query sees; None when plain causal attention does
    rows: torch.Tensor | None = None  # (B, 1): 0 .. B-1, to index each row's own positions


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, preallocated to max_len.

    `length` is how many tokens every row holds, or a tensor (B,) of one count per row when the
    rows are different sequences of different lengths (a server's slots): then each row's new
    tokens go at its own positions, and its queries see only its own cached keys.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int | torch.Tensor = 0
    # With per-row lengths, the longest of them when the caller knows it on the host; else it is
    # read from `length` once per forward, which waits for the device.
    longest: int | None = None

    @classmethod
    def allocate(cls, model: GPT, batch_size: int, max_len: int) -> KVCache:
        """Zeros for every layer in the model's dtype and device, length 0."""
        c = model.config
        kv_heads = c.n_kv_head or c.n_head
        param = next(model.parameters())
        shape = (batch_size, kv_heads, max_len, head_size(c))  # (B, n_kv_head, max_len, head_dim)
        make = lambda: torch.zeros(shape, dtype=param.dtype, device=param.device)  # noqa: E731
        return cls([make() for _ in range(c.n_layer)], [make() for _ in range(c.n_layer)])

    def step(self, T: int, device: torch.device) -> CacheStep:
        """The positions, end and mask of T new tokens, for every layer of one forward."""
        if isinstance(self.length, int):
            start = self.length
            # (T, start + T): query i sees keys 0 .. start + i; the first chunk is plain causal
            mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start) if start else None
            return CacheStep(self, start, start + T, mask)
        if self.longest is None:
            self.longest = int(self.length.max())
        positions = token_positions(self.length, T)  # (B, T)
        end = self.longest + T
        # (B, 1, T, end), broadcast over heads: row b's query t sees keys 0 .. length[b] + t only
        mask = (torch.arange(end, device=device) <= positions[..., None])[:, None]
        return CacheStep(self, positions, end, mask, torch.arange(positions.size(0), device=device)[:, None])

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, step: CacheStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values k, v (B, n_kv_head, T, head_dim) of `layer` at the step's
        positions. Returns the keys and values of every position so far (B, n_kv_head, end, head_dim)."""
        if isinstance(step.positions, int):
            start, T = step.positions, k.size(2)
            self.keys[layer][:, :, start : start + T] = k
            self.values[layer][:, :, start : start + T] = v
        else:
            # indexing rows and positions puts them first: (B, T, n_kv_head, head_dim); unlike a slice's
            # copy, an index_put does not cast (bf16 under autocast into a cache of the weights' fp32)
            dtype = self.keys[layer].dtype
            self.keys[layer][step.rows, :, step.positions] = k.transpose(1, 2).to(dtype)
            self.values[layer][step.rows, :, step.positions] = v.transpose(1, 2).to(dtype)
        return self.keys[layer][:, :, : step.end], self.values[layer][:, :, : step.end]

    def advance(self, T: int) -> None:
        """Count the T tokens a forward added to every row."""
        self.length += T
        if self.longest is not None:
            self.longest += T


class Attention(nn.Module):
    """Self-attention, causal unless config.attention says otherwise, with one fused qkv projection;
    fewer key/value heads for GQA; within model.sliding_window in the layers `is_local_layer` names."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = head_size(config)
        self.qkv = nn.Linear(
            config.d_model,
            (self.n_head + 2 * self.n_kv_head) * self.head_dim,
            bias=config.bias or config.qkv_bias,
        )
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.proj.residual = True  # scaled init
        self.q_norm = make_head_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_head_norm(config, self.head_dim) if config.qk_norm else None
        self.dropout = config.dropout
        self.causal = config.attention == "causal"
        # None: SDPA's own 1 / sqrt(head_dim)
        self.scale = None if config.attn_scale_dim is None else config.attn_scale_dim**-0.5
        self.softcap = config.attn_softcap
        self.window = config.sliding_window if is_local_layer(config, layer) else None
        # Off (None) except under `lmforge inspect`: called with the q, k, v that attention
        # uses (after QK-norm, RoPE and the cache; k, v with n_kv_head heads), so that the
        # probabilities, which the fused kernel never returns, can be computed from them.
        self.capture: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryTables | None,
        cached: CacheStep | None,
        *,
        visible: torch.Tensor | None = None,
        window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """visible: the keys each query may see, broadcast to (B, heads, T, T): for bidirectional
        attention (B, 1, 1, T), all but padding; for packed rows (B, 1, T, T), causal within each example.
        None: plain causal (or, for bidirectional attention, full) attention. window: the keys a local
        layer's queries see (`window_mask`), None where its window hides none."""
        B, T, _ = x.shape  # (B, T, d_model)
        # q: (B, T, n_head, head_dim); k, v: (B, T, n_kv_head, head_dim)
        q, k, v = (
            self.qkv(x)
            .view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
            .split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope.rotate(q), rope.rotate(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        mask = visible
        if cached is not None:  # k, v: (B, n_kv_head, every position so far, head_dim)
            k, v = cached.cache.update(self.layer, k, v, step=cached)
            mask = cached.mask
        if window is not None:  # with the cache's rows or the packed examples' own mask
            mask = window if mask is None else mask & window
        if self.capture is not None:
            self.capture(q, k, v)
        # heads side by side again: (B, T, n_head * head_dim)
        return self.proj(self.attend(q, k, v, mask=mask).transpose(1, 2).reshape(B, T, -1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(scores) v, (B, n_head, T, head_dim) in q's dtype: SDPA's fused kernel, or explicit
        matrices when the scores are soft-capped."""
        dtype, fp32_attention = q.dtype, q.device.type == "cpu" and q.dtype == torch.bfloat16
        if fp32_attention:  # PyTorch's CPU flash-attention backward is ~4x slower in bf16 than in fp32
            q, k, v = q.float(), k.float(), v.float()
        dropout = self.dropout if self.training else 0.0
        with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
            if self.softcap is not None or single_query_compiled(q):
                explicit = dict(cap=self.softcap, scale=self.scale, causal=self.causal, dropout=dropout)
                y = explicit_attention(q, k, v, mask=mask, **explicit)
            else:
                y = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=self.causal and mask is None and q.size(2) > 1,
                    dropout_p=dropout,
                    scale=self.scale,
                    enable_gqa=self.n_kv_head != self.n_head,
                )  # (B, n_head, T, head_dim)
        return y.to(dtype)


def single_query_compiled(q: torch.Tensor) -> bool:
    """Whether attention of `q` (B, n_head, T, head_dim) is a decode step (one query per row) traced
    by torch.compile on a CPU: there explicit products beat SDPA. Inductor turns each product of a
    single query into a reduction that it fuses with the mask and the softmax, while SDPA's CPU flash
    kernel runs one small block per row and head: at the demo's size 11 us a layer at one row, 28 at
    8 rows, which grew more than the matrix products did (benchmarks/RESULTS.md)."""
    return q.size(2) == 1 and q.device.type == "cpu" and torch.compiler.is_compiling()


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    cap: float | None,
    scale: float | None,
    causal: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention with the score matrix made explicitly, as transformers' eager path does; with `cap`,
    soft-capped scores, cap * tanh(scores / cap), before the softmax (Gemma 2), which SDPA has no
    step for.

    q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, S, head_dim), the last T keys the queries' own
    positions; mask: True where a query sees a key (None: every key, or every earlier one if causal).
    Returns (B, n_head, T, head_dim).
    """
    groups = q.size(1) // k.size(1)  # GQA: query head h reads kv head h // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, n_head, S, hd)
    scores = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5 if scale is None else scale)  # (B, n_head, T, S)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    T, S = scores.shape[-2:]
    if mask is None and causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(probs, p=dropout) @ v if dropout else probs @ v


def window_mask(
    positions: int | torch.Tensor, T: int, *, end: int, window: int, device: torch.device
) -> torch.Tensor | None:
    """Which keys 0 .. end-1 each of T new queries sees within a sliding `window` (its own position and
    the window - 1 before it): (T, end) for queries at positions.. positions+T-1, (B, 1, T, end) for
    per-row positions (B, T). None when no query is `window` positions in, so the window hides nothing;
    per-row positions under torch.compile always get the mask: there `end` is the graph's dynamic
    number of keys (serve's decode step), which comparing with the window would specialize the graph
    to. (Those rows have a mask of their own anyway; a batch of whole sequences keeps SDPA's causal
    kernel.)"""
    if (isinstance(positions, int) or not torch.compiler.is_compiling()) and end <= window:
        return None
    if isinstance(positions, int):
        queries = torch.arange(positions, positions + T, device=device)[:, None]  # (T, 1)
    else:
        queries = positions[..., None]  # (B, T, 1)
    keys = torch.arange(end, device=device)
    mask = (keys <= queries) & (keys > queries - window)  # (T, end) or (B, T, end)
    return mask if isinstance(positions, int) else mask[:, None]


class ReLUSquared(torch.autograd.Function):
    """relu(x)², differentiated by hand: 2·relu(x) is the whole derivative, so the backward is one
    product instead of autograd's pow, mul and threshold chain (about 3x faster on a CPU)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return grad * (r + r)


class MLP(nn.Module):
    """Up-projection, activation (GELU, SwiGLU, GeGLU or ReLU²), down-projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = mlp_hidden_size(config)
        self.kind = config.mlp
        gated = config.mlp in GATED_MLPS
        self.up = nn.Linear(config.d_model, (2 if gated else 1) * hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.down.residual = True  # scaled init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, hidden), swiglu and geglu: (B, T, 2 * hidden)
        if self.kind in GATED_MLPS:
            gate, value = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * value
        elif self.kind == "relu2":
            # without autograd (evaluation, generation) in place: the widest tensor of the block is
            # not allocated twice more, about a quarter of the MLP's time on a CPU
            h = ReLUSquared.apply(h) if torch.is_grad_enabled() else F.relu_(h).square_()
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.down(h)  # (B, T, d_model)


class Block(nn.Module):
    """A pre-norm Transformer block: x + attention(norm(x)), then x + mlp(norm(x)); with
    model.post_norms, x + norm(attention(norm(x))) and x + norm(mlp(norm(x))) (Gemma 2, 3)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config, config.d_model)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config, config.d_model)
        self.mlp = MLP(config)
        self.post_attn_norm = make_norm(config, config.d_model) if config.post_norms else None
        self.post_mlp_norm = make_norm(config, config.d_model) if config.post_norms else None
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryTables | None,
        cached: CacheStep | None,
        *,
        visible: torch.Tensor | None = None,
        window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn(self.norm1(x), rope, cached, visible=visible, window=window)  # (B, T, d_model)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + self.drop(h)
        h = self.mlp(self.norm2(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + self.drop(h)


class GPT(nn.Module):
    """Token (and position) embeddings and the blocks (the body), then a final norm and the head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = (
            nn.Embedding(config.block_size, config.d_model) if config.position == "learned" else None
        )
        rope = config.position == "rope"
        self.rotary = Rotary(rope_frequencies(config), config.block_size) if rope else None
        # the sliding-window layers' own positions (Gemma 3: a base of 10,000 against 1,000,000), unscaled
        self.local_rotary = (
            Rotary(rope_frequencies(config, theta=config.rope_local_theta), config.block_size)
            if rope and config.rope_local_theta is not None
            else None
        )
        # True under differential privacy: position ids per sequence, [B, T] rather than [T] broadcast,
        # so that the per-sample gradient hooks of pos_embed see each sequence's own rows
        self.per_sample_positions = False
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.d_model)
        self.head = LMHead(config)  # every model has one: a task model keeps its base's
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.head != "lm":  # a task head outputs instead, e.g. `span_head` (heads.py)
            self.add_module(head_attribute(config.head), HEADS[config.head](config))
            if not config.tie_embeddings:
                self.head.weight.requires_grad_(False)  # unused: no optimizer state, no DDP unused-grad error
        # A span model's word-match input: a vector added to each context token the question holds
        self.match_embed = nn.Embedding(2, config.d_model) if config.word_match else None
        self.apply(self._init_weights)
        if self.match_embed is not None:  # zero: fine-tuned from a base, the model starts as the base
            nn.init.zeros_(self.match_embed.weight)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            if residual and self.config.zero_init_residual:  # each block starts as the identity
                std = 0.0
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def output_head(self) -> Head:
        """The head that forward outputs through: model.head's (heads.py)."""
        return getattr(self, head_attribute(self.config.head))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        only_targets: bool = False,
        matched: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> HeadOutput:
        """idx: [B, T] token ids. Returns the head's (logits, loss), the loss None without `targets`:
        next-token logits [B, T, V] and their mean cross-entropy, or with a span head start and end
        scores [B, T, 2] and `span_loss`. `only_targets`: see `LMHead.output`.

        `matched` [B, T] (bool) marks the context tokens whose word the question holds, the input of
        a model.word_match model when there are no targets; in training their SPAN_MATCH flags say it.

        `documents` [B, T] (int) makes each row several sequences packed end to end (data.pack): the
        index of the sequence each position belongs to. Attention stays within a sequence and positions
        restart at each, so every sequence is computed as it would be alone.
        """
        x = self.residual_stream(idx, targets, cache=cache, matched=matched, documents=documents)
        # the head picks the positions it scores, and reads them through the final norm
        return self.output_head.output(x, targets, norm=self.norm, only_targets=only_targets)

    def residual_stream(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        matched: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The body's output (B, T, d_model): the embeddings through every block, before the final norm.
        A span model's targets mark the padding that bidirectional attention must not see, and the
        word-match input; `documents` the packed sequences of each row (see `forward`)."""
        T = idx.size(1)
        cached = cache.step(T, idx.device) if cache is not None else None
        if (end := cached.end if cached is not None else T) > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {self.config.block_size}")
        if documents is not None and cached is not None:
            raise ValueError("packed sequences (documents) are for training; a KV cache holds one per row")
        in_row = at = cached.positions if cached is not None else 0  # where the T new tokens sit in the row
        if documents is not None:
            at = document_positions(documents)  # (B, T): each sequence's own, from 0
        x = self.drop(self.embed_inputs(idx, at, targets, matched=matched))  # (B, T, d_model)
        rope = self.rotary.tables(at, T) if self.rotary is not None else None
        local_rope = self.local_rotary.tables(at, T) if self.local_rotary is not None else rope
        window = None
        if self.config.sliding_window is not None:
            window = window_mask(in_row, T, end=end, window=self.config.sliding_window, device=idx.device)
        visible = self.visible_keys(targets) if documents is None else document_mask(documents)
        for block in self.blocks:
            if block.attn.window is None:
                x = block(x, rope, cached, visible=visible)
            else:
                x = block(x, local_rope, cached, visible=visible, window=window)
        if cache is not None:
            cache.advance(T)
        return x

    def visible_keys(self, targets: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, 1, T): the keys that bidirectional attention may see, broadcast over heads and queries;
        None for causal attention, or without targets to mark the padding."""
        if self.config.attention != "bidirectional" or targets is None:
            return None
        # span targets mark padding (IGNORE_INDEX), which no position may see; the first position
        # always can, so that a row of padding alone has a key (no NaN)
        visible = targets != IGNORE_INDEX  # (B, T)
        visible[:, 0] = True
        return visible[:, None, None, :]

    def embed_inputs(
        self,
        idx: torch.Tensor,
        positions: int | torch.Tensor,
        targets: torch.Tensor | None,
        *,
        matched: torch.Tensor | None,
    ) -> torch.Tensor:
        """The first residual stream (B, T, d_model): token embeddings, plus learned positions (those
        from the int `positions` on, or each row's own (B, T)) and the word-match vector where the
        model has them."""
        x = self.embed(idx)  # (B, T, d_model)
        if self.config.embed_scale:  # sqrt(d_model) rounded to the embeddings' dtype, as transformers does
            x = x * torch.tensor(self.config.d_model**0.5, dtype=x.dtype, device=x.device)
        if self.pos_embed is not None:  # (T, d_model) broadcast over the batch, or (B, T, d_model)
            if isinstance(positions, int):
                positions = torch.arange(positions, positions + idx.size(1), device=idx.device)  # (T,)
            if self.per_sample_positions and positions.dim() == 1:
                positions = positions.expand(idx.size(0), -1)  # (B, T)
            x = x + self.pos_embed(positions)
        if self.match_embed is not None:
            if matched is None and targets is None:
                raise ValueError("a model.word_match model reads `matched` (or span targets) with its tokens")
            if matched is None:
                matched = word_matches(targets)
            x = x + self.match_embed(matched.long())
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream x (..., d_model): final norm, the LM head, its soft-cap."""
        return self.head.logits(self.norm(x))  # (..., V)

    def num_params(self) -> int:
        """All trainable parameters, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at every position of `seq_len`-token sequences (block_size):
        about 6N for the weights plus 6·L·d·T for causal attention (`attention_flops`)."""
        T = seq_len or self.config.block_size
        return self.training_flops(1, T) / T

    def training_flops(self, batch: int, seq_len: int, head_rows: int | None = None) -> float:
        """Matmul FLOPs of one forward and backward pass over `batch` sequences of `seq_len` tokens.

        Per weight and token: 2 forward and 4 backward, or 2 for a frozen weight (only its input's
        gradient). The head runs at `head_rows` rows (`only_targets`), else at every token.
        Attention's products, forward and backward, are 3x `attention_flops`. Lookups, norms and
        element-wise ops are free. `train`, `estimate` and the benchmarks all count with this.
        """
        tokens = batch * seq_len
        head = self.head.weight
        lookups = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        per_token = sum(
            (6 if p.requires_grad else 4) * p.numel()
            for p in self.parameters()
            if p.dim() >= 2 and id(p) not in lookups and p is not head
        )
        head_flops = (
            (6 if head.requires_grad else 4) * head.numel() * (tokens if head_rows is None else head_rows)
        )
        if self.config.head != "lm":  # a task head (a matrix counted above) replaces the lm head
            head_flops = 0
        attention = 3 * attention_flops(self.config, seq_len) * tokens  # backward: twice the forward
        return per_token * tokens + head_flops + attention


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T): each position's offset from the start of its packed sequence (`documents` (B, T))."""
    t = torch.arange(documents.size(1), device=documents.device).expand_as(documents)  # (B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values  # minus the last start at or before t


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): query t sees key s <= t of its own packed sequence only; broadcast over heads.
    A query always sees itself, so no row of the mask is empty (padding is a sequence of its own)."""
    same = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    T = documents.size(1)
    return (same & torch.ones(T, T, dtype=torch.bool, device=documents.device).tril())[:, None]


def attention_flops(model: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of every layer's attention products at `seq_len`-token sequences.

    QK^T and PV cost 2·d·T each per token (d = n_head x head_dim, the heads' channels) over the whole
    T x T score matrix, which bidirectional attention computes. Causal attention counts half, what its
    kernels execute: flash attention and SDPA's causal kernels skip the score blocks above the
    diagonal. PaLM's 12·L·d·T (fwd + bwd) counts the full matrix, and so do SDPA's MATH backend and
    torch's FlopCounterMode.
    """
    full = 4 * model.n_layer * model.n_head * head_size(model) * seq_len
    return full // 2 if model.attention == "causal" else full
