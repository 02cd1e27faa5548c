"""`lmforge estimate`: parameters, FLOPs, per-device memory and training time before a run.

The parameter count and FLOPs come from the real `GPT`, built on the `meta` device (no
memory, any size). Memory is a model of what one training step holds at its peak:

- weights, gradients: fp32 (4 bytes per parameter; bf16 autocast keeps fp32 master weights);
- optimizer state: AdamW 2 fp32 moments, SGD 1 momentum buffer (none without momentum),
  Muon 1 momentum buffer for the hidden matrices plus AdamW's 2 for the rest;
- activations: what autograd saves in this model's forward (derived op by op below and
  checked to the byte against `saved_tensors_hooks` in the tests), and the cross-entropy
  backward's two vocab-sized gradients (the logits themselves are freed with the forward: the
  objective keeps only the loss, and log_softmax saves its own output);
- buffers: bf16 weight copies under autocast, DDP's gradient buckets, FSDP's unsharded
  (all-gathered) parameters and gradients.

Fine-tuning on one device (`finetune` in the result) compares full fine-tuning with LoRA on a
base held in fp32, bf16, int8 or nf4 (`lora.base_dtype`): the frozen block matrices take their
precision's bytes (int8 adds an fp32 scale per row; nf4 an int8 scale per 64 weights and an fp32
factor per 256 scales); gradients and optimizer state are the adapters' alone; the activations are
what autograd saves around a frozen model: no inputs of frozen matrices (the head's, the
embeddings' ids), nothing in the first block before an adapter (the embedding output needs no
gradient), each adapter's input and rank-r intermediate. A low-precision base saves its
low-precision matrices for backward, not autocast's bf16 copies, and dequantizes one matrix at a time.

DDP replicates everything; FSDP (FSDP2, each block then the root) divides weights,
gradients and optimizer state by the number of devices. With `grad_accum_steps` = 1 and
gradients freed after each update, gradients and activations are never all alive together:
backward frees a block's activations as it allocates its gradients, so the peak is weights +
optimizer + buffers + the largest of: the activations at the start of backward, and the
activations still alive plus the gradients made so far while backward works through the
last and the first block. With accumulation the gradients of the previous micro-batches
live through the next forward and add to all of these.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lmforge.config import Config, LoraConfig, ModelConfig, head_size, load_config
from lmforge.errors import LmforgeError
from lmforge.model.gpt import GATED_MLPS, GPT, attention_flops, is_local_layer, mlp_hidden_size
from lmforge.recipes import config_path
from lmforge.runtime import DEVICE_PEAK_FLOPS, Peak, autocast, device_peak, format_flops, resolve_dtype
from lmforge.train.optim import split_parameters
from lmforge.train.step import Stepper

FP32 = 4  # bytes
INDEX = 8  # int64 token ids
STRATEGIES = ("none", "ddp", "fsdp")
DEVICE_TYPES = ("cpu", *DEVICE_PEAK_FLOPS)
CHINCHILLA_TOKENS_PER_PARAM = 20
# bytes per frozen block weight by lora.base_dtype, scales included but int8's (one fp32 per row)
BASE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
FINETUNE_LORA_RANK = 16  # the rank of the LoRA rows when the config sets none (lora.rank = 0)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model by role, from the model itself."""

    total: int  # trainable parameters, a tied embedding once
    per_block: int
    root: int  # outside the blocks: embeddings, final norm, head (FSDP's root unit)
    linear: int  # weights and biases of nn.Linear layers: what autocast copies to bf16
    linear_per_block: int
    matrices: int  # Muon's share (hidden matrices); the rest is AdamW's under Muon
    flops_per_token: float  # training (forward + backward), from GPT.flops_per_token
    attention_flops_per_token: float  # of flops_per_token: attention's products (causal: half the matrix)
    recompute_flops_per_token: float  # one more forward of the blocks: activation checkpointing's price


def count_parameters(model: ModelConfig) -> ParamCounts:
    """Build the model on the meta device (no memory) and count its parameters and FLOPs."""
    with torch.device("meta"):
        gpt = GPT(model)
    linear = {id(p): p.numel() for m in gpt.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    per_block = sum(p.numel() for p in gpt.blocks[0].parameters())
    linear_per_block = sum(
        p.numel() for m in gpt.blocks[0].modules() if isinstance(m, nn.Linear) for p in m.parameters()
    )
    total = gpt.num_params()
    # one more forward of the blocks: 2 FLOPs per weight, and attention's products counted as in training
    recompute = model.n_layer * 2 * per_block + attention_flops(model, model.block_size)
    return ParamCounts(
        total=total,
        per_block=per_block,
        root=total - model.n_layer * per_block,
        linear=sum(linear.values()),
        linear_per_block=linear_per_block,
        matrices=sum(p.numel() for p in split_parameters(gpt)["matrices"]),
        flops_per_token=gpt.flops_per_token(),
        attention_flops_per_token=float(3 * attention_flops(model, model.block_size)),
        recompute_flops_per_token=float(recompute),
    )


def compute_bytes(dtype: str) -> int:
    """Bytes per element of activations in the training dtype (autocast's lower precision)."""
    return FP32 if dtype == "fp32" else 2


class _Saved(NamedTuple):
    """Bytes autograd saves in part of a training forward: per token, and per forward whatever the
    micro-batch (tensors the size of a weight, a rope table or the T x T scores: one copy per call)."""

    per_token: float = 0.0
    fixed: float = 0.0

    def plus(self, other: _Saved, times: int = 1) -> _Saved:
        """This and `times` x `other`."""
        return _Saved(self.per_token + times * other.per_token, self.fixed + times * other.fixed)


def _norm_saved(model: ModelConfig, input_bytes: int = FP32, *, cpu: bool = True) -> _Saved:
    """What a norm over d_model channels saves: per token its input and statistics (fused layer_norm:
    mean and rstd; the fused RMSNorm of model/gpt.py: rstd); per call Gemma's scale 1 + weight, a new
    fp32 tensor that the fused norm saves. The input is the fp32 residual stream, or in a post-norm
    the branch's output (`input_bytes`: the compute dtype), which CUDA's autocast casts to fp32 for
    layer_norm (the CPU's keeps it). On a GPU the other norms are assumed to save what the CPU's fused
    ones do (F.rms_norm there, and Gemma's reference norm, may save more). The linear after a norm
    saves its output, counted there."""
    layernorm = model.norm == "layernorm"
    if layernorm and not cpu:
        input_bytes = FP32
    statistics = 2 if layernorm else 1
    scale = FP32 * model.d_model if model.norm == "rmsnorm1p" else 0
    return _Saved(input_bytes * model.d_model + statistics * FP32, scale)


def _branch_bytes(model: ModelConfig, dtype: str, cpu: bool) -> int:
    """Bytes per element of a residual branch's output (attention's, the MLP's) where it joins the
    stream: the compute dtype, or fp32 after a LayerNorm post-norm under CUDA's autocast."""
    return FP32 if model.post_norms and model.norm == "layernorm" and not cpu else compute_bytes(dtype)


def _trains(lora: LoraConfig | None, linear: str) -> bool:
    """Whether the blocks' Linear `linear` (qkv, proj, up, down) learns: every one in full training, and
    LoRA's targets through their adapters. Only a learning Linear saves its input (for its weight's
    gradient); a frozen one needs just its weight to pass the gradient on."""
    return lora is None or linear in lora.targets


def _explicit_attention_saved(model: ModelConfig, dtype: str, cpu: bool) -> float:
    """Bytes per token that `explicit_attention` (soft-capped scores, any device) saves: matmul's
    copy of q and repeat_interleave's of k and v (n_head heads each), tanh's output (the capped
    scores), softmax's fp32 output, and the probabilities as the product with v takes them: cast back
    to a bf16 q's dtype (a GPU's; the CPU runs attention in fp32) or, under dropout, dropped, with the
    dropout's mask (the CPU's a tensor of the scores' dtype, the fused kernel's one byte). The inverted
    mask is per call (`_attention_saved`); proj's input, a copy, is counted with the Linears."""
    a = FP32 if cpu else compute_bytes(dtype)  # the dtype of q, k, v and the scores
    heads, scores = model.n_head * head_size(model), model.n_head * model.block_size
    saved = 3 * a * heads + a * scores + FP32 * scores
    if model.dropout > 0:
        saved += (a if cpu else 1) * scores + a * scores
    elif a != FP32:
        saved += a * scores
    return saved


def _attention_saved(model: ModelConfig, dtype: str, cpu: bool, *, local: bool) -> tuple[_Saved, bool]:
    """What the attention between qkv and proj saves when its input needs a gradient (in a sliding-window
    layer if `local`), and whether proj's input is SDPA's saved output itself (a view of it) rather
    than a copy.

    SDPA saves q, k, v, its output (n_head x head_dim wide, not necessarily d_model) and the
    log-sum-exp; q and k are views of the qkv output unless rope/QK-norm made new tensors, and v keeps
    the whole qkv output alive. Given a window's boolean mask, SDPA saves it turned into additive
    scores in q's dtype (T x T, per call; the CPU's math path, under dropout, adds it unsaved). On
    CPU in bf16 the model runs attention in fp32, so SDPA saves fp32 copies of q, k, v and its output.
    Soft-capped scores take explicit matrices (`_explicit_attention_saved`), which save the causal or
    window mask inverted, one byte per element per call. In bf16 rope casts its cos and sin tables
    for q and for k on every call. On a GPU, SDPA (flash or memory-efficient) is assumed to save in
    the compute dtype what the CPU's saves in fp32, a window's mask included, with dropout inside the
    kernel; the explicit matrices are the same as on the CPU, in the compute dtype."""
    c, H, T = compute_bytes(dtype), model.n_head, model.block_size
    Hkv, hd = model.n_kv_head or H, head_size(model)
    qkv, qk, heads = (H + 2 * Hkv) * hd, (H + Hkv) * hd, H * hd
    fp32_attention = cpu and dtype != "fp32"
    a = FP32 if fp32_attention else c  # dtype of SDPA's inputs and output
    fixed = 0.0
    if model.attn_softcap is not None:
        saved, proj_reads_output, fixed = _explicit_attention_saved(model, dtype, cpu), False, T * T
    elif cpu and model.dropout > 0:
        # CPU flash attention has no dropout: the math path saves q, k, v (k and v repeated to n_head),
        # per head T x T softmax output, dropout mask and dropped probabilities (fp32)
        saved, proj_reads_output = a * 3 * heads + 3 * FP32 * H * T, False
    else:
        if fp32_attention:  # fp32 copies of q, k, v; SDPA's fp32 output and log-sum-exp
            saved, proj_reads_output = FP32 * qkv + FP32 * heads + FP32 * H, False
        else:
            # v keeps the whole qkv output alive; rope or QK-norm feed SDPA new q and k, laid out
            # [B, T, H, hd] as the qkv output is, so SDPA's output is too and proj's input is a view of it
            saved, proj_reads_output = c * qkv + FP32 * H + c * heads, True
            if model.position == "rope" or model.qk_norm:
                saved += c * qk
        if local and model.sliding_window is not None and T > model.sliding_window:
            fixed = a * T * T
    if model.qk_norm:  # the fused RMSNorm on q and k saves its inputs and an fp32 rstd per head
        saved += FP32 * (H + Hkv)
        if not proj_reads_output:
            saved += c * qkv  # its inputs are views of the qkv output (the flash path saves it anyway)
        if model.norm == "rmsnorm1p":  # Gemma's head norms: their fp32 1 + weight, per call
            fixed += 2 * FP32 * hd
    if model.position == "rope" and dtype != "fp32":
        fixed += 4 * c * T * hd
    return _Saved(saved, fixed), proj_reads_output


def _mlp_saved(model: ModelConfig, dtype: str) -> float:
    """Bytes per token the MLP's activation saves: gelu/relu²: its input; swiglu/geglu: up (both
    halves) and the activated gate."""
    return (3 if model.mlp in GATED_MLPS else 1) * mlp_hidden_size(model) * compute_bytes(dtype)


def _block_saved(
    model: ModelConfig, dtype: str, cpu: bool, *, layer: int, lora: LoraConfig | None, input_grad: bool
) -> tuple[_Saved, bool]:
    """What autograd saves in block `layer`'s training forward, and whether the block's output needs a
    gradient. `input_grad`: whether its input (the residual stream) needs one; under LoRA the first
    block's does not (the embedding is frozen), so autograd records nothing there before the first
    adapter. The residual stream stays fp32 under autocast (fp32 embedding plus bf16 branches); a
    learning Linear saves its input in the compute dtype; a post-norm saves its branch's output.

    A LoRA adapter saves its input through its A matrix, its rank-r intermediate through B, and with
    lora.dropout > 0 the fp32 dropout mask (where the input needs a gradient) and the dropped input,
    which A saves instead of the input. peft casts a bf16 input to fp32 before A (which autocast casts
    back): proj's adapter then saves a copy of SDPA's output, not the output itself (on a GPU; the CPU
    runs attention in fp32, and proj's input is a copy anyway)."""
    c, d, branch = compute_bytes(dtype), model.d_model, _branch_bytes(model, dtype, cpu)
    width = {"qkv": d, "proj": model.n_head * head_size(model), "up": d, "down": mlp_hidden_size(model)}
    needs_grad = {"qkv": input_grad}  # whether each Linear's input needs a gradient
    saved = _norm_saved(model) if input_grad else _Saved()
    attention, proj_reads_output = _attention_saved(model, dtype, cpu, local=is_local_layer(model, layer))
    needs_grad["proj"] = input_grad or _trains(lora, "qkv")
    if needs_grad["proj"]:
        saved = saved.plus(attention)
    adapter_copies = lora is not None and (lora.dropout > 0 or dtype != "fp32")
    proj_input_counted = needs_grad["proj"] and proj_reads_output and not adapter_copies
    attention_out_grad = needs_grad["proj"] or _trains(lora, "proj")
    needs_grad["up"] = input_grad or attention_out_grad
    if needs_grad["up"]:
        saved = saved.plus(_norm_saved(model))
    needs_grad["down"] = needs_grad["up"] or _trains(lora, "up")
    if needs_grad["down"]:
        saved = saved.plus(_Saved(_mlp_saved(model, dtype)))
    mlp_out_grad = needs_grad["down"] or _trains(lora, "down")
    branches = int(attention_out_grad) + int(mlp_out_grad)  # residual branches whose output needs a gradient
    if model.post_norms:
        saved = saved.plus(_norm_saved(model, c, cpu=cpu), branches)
    if model.dropout > 0:  # masks of the residual branches, in the branch's dtype
        saved = saved.plus(_Saved(branch * d), branches)
    for linear in width:  # the inputs of the learning Linears (proj's may be SDPA's output, counted)
        if _trains(lora, linear) and not (linear == "proj" and proj_input_counted):
            saved = saved.plus(_Saved(c * width[linear]))
    for linear in lora.targets if lora is not None else ():
        saved = saved.plus(_Saved(c * lora.rank))
        if lora.dropout > 0 and needs_grad[linear]:
            saved = saved.plus(_Saved(FP32 * width[linear]))
    return saved, needs_grad["up"] or mlp_out_grad


def block_activation_bytes(
    model: ModelConfig, dtype: str, micro_batch: int, *, cpu: bool, lora: LoraConfig | None = None
) -> float:
    """Bytes that autograd saves in the training forward of one block (the largest: a sliding-window
    layer saves its mask) over `micro_batch` sequences, in full training or with `lora`'s adapters (a
    block after the first: its input needs a gradient either way)."""
    tokens = micro_batch * model.block_size
    blocks = (
        _block_saved(model, dtype, cpu, layer=i, lora=lora, input_grad=True)[0] for i in range(model.n_layer)
    )
    return max(b.per_token * tokens + b.fixed for b in blocks)


def outside_activation_bytes(
    model: ModelConfig, dtype: str, *, lora: LoraConfig | None = None
) -> tuple[float, float]:
    """Bytes per token outside the blocks: (saved by autograd, cross-entropy backward transients).

    Saved: the targets, the final norm, and log_softmax's fp32 output (vocab-sized); when the
    embeddings and head learn (full training, not LoRA), also the token ids, the embedding dropout
    mask and the head's input. The backward of nll_loss and log_softmax each make an fp32
    vocab-sized gradient. Per forward (`_outside_fixed`): a few tensors whatever the micro-batch.
    """
    c, V, d = compute_bytes(dtype), model.vocab_size, model.d_model
    saved = INDEX + _norm_saved(model).per_token + FP32 * V
    if lora is None:  # the embeddings' ids, their dropout mask, the head's input
        saved += INDEX + c * d
        if model.dropout > 0:
            saved += FP32 * d
    if model.logit_softcap is not None:  # tanh saves its fp32 output
        saved += FP32 * V
    return saved, 2 * FP32 * V


def _outside_fixed(model: ModelConfig, lora: LoraConfig | None) -> float:
    """Bytes saved once per forward outside the blocks: nll_loss's total weight (an fp32 scalar), the
    final norm's per-call tensors, and where the embeddings learn the learned positions' ids 0..T-1
    (int64, broadcast over the batch) and model.embed_scale's fp32 scalar sqrt(d_model)."""
    saved = FP32 + _norm_saved(model).fixed
    if lora is None:
        saved += INDEX * model.block_size if model.position == "learned" else 0
        saved += FP32 if model.embed_scale else 0
    return saved


def saved_activation_bytes(
    model: ModelConfig, dtype: str, micro_batch: int, *, cpu: bool, lora: LoraConfig | None = None
) -> float:
    """Bytes autograd saves in a training forward of `micro_batch` sequences of block_size tokens,
    in full training or with `lora`'s adapters on a frozen model."""
    tokens = micro_batch * model.block_size
    saved = _Saved(outside_activation_bytes(model, dtype, lora=lora)[0], _outside_fixed(model, lora))
    for layer in range(model.n_layer):
        input_grad = lora is None or layer > 0
        saved = saved.plus(_block_saved(model, dtype, cpu, layer=layer, lora=lora, input_grad=input_grad)[0])
    return saved.per_token * tokens + saved.fixed


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch over the backward pass.

    `peak`: the highest, at the start of backward or in the last block's.
    While backward works through block i (L down to 1),
    `i * per_block + working` are alive: what the blocks not yet done keep, plus the working
    set of the block in progress (under LoRA the first block keeps less than `per_block`).
    """

    peak: float
    per_block: float
    working: float


def _attention_backward_bytes(model: ModelConfig, dtype: str, cpu: bool) -> float:
    """Bytes per token that attention's backward holds at its peak beyond what the block saved. With
    explicit score matrices (soft-capping; the CPU's math path under dropout) the gradients of the
    probabilities and of the scores, T x T per head each, are alive together; under dropout the
    dropped probabilities are freed first, so one more. Measured on CPU: the step's peak is in the
    softmax's (or the dropout's) backward. A fused kernel works through the scores in tiles: none."""
    if model.attn_softcap is None and not (cpu and model.dropout > 0):
        return 0.0
    a = FP32 if cpu else compute_bytes(dtype)  # the scores' dtype
    return (1 if model.dropout > 0 else 2) * a * model.n_head * model.block_size


def _mlp_half_saved(model: ModelConfig, dtype: str, cpu: bool, *, lora: LoraConfig | None) -> float:
    """Bytes per token that a block (after the first) saves after attention and frees before
    attention's backward: the second norm's, the MLP activation's, the learning MLP Linears' inputs,
    the post-norms', the residual branches' dropout masks."""
    c = compute_bytes(dtype)
    saved = _norm_saved(model).per_token + _mlp_saved(model, dtype)
    saved += c * model.d_model if _trains(lora, "up") else 0
    saved += c * mlp_hidden_size(model) if _trains(lora, "down") else 0
    if model.post_norms:
        saved += 2 * _norm_saved(model, c, cpu=cpu).per_token
    if model.dropout > 0:
        saved += 2 * _branch_bytes(model, dtype, cpu) * model.d_model
    return saved


def activation_bytes(
    model: ModelConfig,
    dtype: str,
    micro_batch: int,
    *,
    cpu: bool,
    checkpointing: bool,
    lora: LoraConfig | None = None,
) -> Activations:
    """Activation bytes of `micro_batch` sequences of block_size tokens, with or without per-block
    checkpointing, in full training or with `lora`'s adapters on a frozen model.

    Without checkpointing the peak is at the start of backward: every saved tensor and the
    cross-entropy's two vocab-sized gradients. With it, each block keeps only
    its fp32 input (post-norms or not); backward recomputes one block at a time, after the
    cross-entropy is done. A block's backward also holds two gradients of the residual stream, and
    one of the MLP's up-projection output (the saved tensors it replaces are freed as it goes) or,
    later, attention's T x T gradients (`_attention_backward_bytes`).
    """
    tokens = micro_batch * model.block_size
    c, d, F = compute_bytes(dtype), model.d_model, mlp_hidden_size(model)
    block = block_activation_bytes(model, dtype, micro_batch, cpu=cpu, lora=lora)
    saved, transient = outside_activation_bytes(model, dtype, lora=lora)
    mlp = c * ((2 if model.mlp in GATED_MLPS else 1) * F)
    attention = _attention_backward_bytes(model, dtype, cpu) - _mlp_half_saved(model, dtype, cpu, lora=lora)
    backward = max(mlp, attention) + 2 * FP32 * d
    if checkpointing:
        per_block, working = FP32 * d * tokens, block + backward * tokens
        blocks = model.n_layer * per_block
        start = blocks + (saved + transient) * tokens + _outside_fixed(model, lora)
    else:
        per_block, working = block, backward * tokens
        saved_bytes = saved_activation_bytes(model, dtype, micro_batch, cpu=cpu, lora=lora)
        blocks = (
            saved_bytes - saved * tokens
        )  # every block's (LoRA's first keeps less), their per-call tensors
        start = saved_bytes + transient * tokens
    return Activations(peak=max(start, blocks + working), per_block=per_block, working=working)


def optimizer_bytes(config: Config, params: ParamCounts) -> float:
    """fp32 optimizer state: AdamW 2 moments, SGD 1 momentum buffer,
    Muon 1 for matrices + AdamW for the rest."""
    o = config.optim
    if o.name == "adamw":
        return 2 * FP32 * params.total
    if o.name == "sgd":
        return FP32 * params.total if o.momentum > 0 else 0.0
    return FP32 * params.matrices + 2 * FP32 * (params.total - params.matrices)


@dataclass(frozen=True)
class LoraCounts:
    """What LoRA changes in a model, from the model itself (on the meta device)."""

    rank: int
    adapters: int  # trainable parameters: rank x (in + out) per adapted Linear
    adapted: int  # adapted Linear layers, each saving its rank-r intermediate
    frozen: int  # weights of the blocks' Linear matrices: what lora.base_dtype stores
    frozen_biases: int
    rows: int  # output rows of those matrices: int8's per-row scales
    last: int  # weights of the last of them (mlp.down): the first that backward dequantizes
    flops_per_token: float  # training: no weight gradients for the frozen matrices, 6 per adapter weight


def count_lora(model: ModelConfig, lora: LoraConfig, params: ParamCounts) -> LoraCounts:
    """Count what LoRA with `lora`'s rank and targets adapts and freezes in `model`."""
    with torch.device("meta"):
        gpt = GPT(dataclasses.replace(model, n_layer=1))
    linears = [(name, m) for name, m in gpt.blocks[0].named_modules() if isinstance(m, nn.Linear)]
    adapted = [m for name, m in linears if name.rpartition(".")[2] in lora.targets]
    adapters = model.n_layer * sum(lora.rank * (m.in_features + m.out_features) for m in adapted)
    frozen = model.n_layer * sum(m.weight.numel() for _, m in linears)
    return LoraCounts(
        rank=lora.rank,
        adapters=adapters,
        adapted=model.n_layer * len(adapted),
        frozen=frozen,
        frozen_biases=model.n_layer * sum(m.bias.numel() for _, m in linears if m.bias is not None),
        rows=model.n_layer * sum(m.out_features for _, m in linears),
        last=linears[-1][1].weight.numel(),
        flops_per_token=params.flops_per_token - 2 * frozen + 6 * adapters,
    )


def dequantize_bytes(base_dtype: str, c: int) -> float:
    """Bytes per weight that dequantizing a matrix holds at once, into the compute dtype (`c` bytes):
    bf16 a cast; int8 its values scaled in fp32, then the cast; torchao's NF4 two int64 code indices
    per byte, their fp32 values, scaled, stacked (20 bytes), then the cast."""
    cast = c if c != FP32 else 0
    if base_dtype == "bf16":
        return float(c)
    return (FP32 if base_dtype == "int8" else 20.0) + cast


def lora_memory(
    config: Config, params: ParamCounts, counts: LoraCounts, *, base_dtype: str, cpu: bool
) -> Memory:
    """Memory of one LoRA training step on one device, its frozen block matrices in `base_dtype`
    (activation checkpointing as train.activation_checkpointing)."""
    m, t = config.model, config.train
    ac = t.activation_checkpointing
    full = memory(config, params, "none", devices=1, checkpointing=ac, cpu=cpu)
    c = compute_bytes(t.dtype)
    base = BASE_BYTES[base_dtype] * counts.frozen + (FP32 * counts.rows if base_dtype == "int8" else 0)
    weights = FP32 * (params.total - counts.frozen + counts.adapters) + base
    gradients = FP32 * counts.adapters
    optimizer = optimizer_bytes(config, params) / params.total * counts.adapters
    lora = dataclasses.replace(config.lora, rank=counts.rank)
    activations = activation_bytes(m, t.dtype, t.batch_size, cpu=cpu, checkpointing=ac, lora=lora).peak
    if base_dtype == "fp32":
        buffers = full.buffers  # autocast's bf16 copies of every Linear, saved for backward
    else:  # autocast copies the head; backward starts by dequantizing the last block's mlp.down
        head = params.linear - counts.frozen - counts.frozen_biases
        buffers = (2.0 * head if t.dtype != "fp32" else 0.0) + dequantize_bytes(base_dtype, c) * counts.last
    peak = weights + optimizer + buffers + activations + gradients
    return Memory(weights, gradients, optimizer, activations, buffers, peak)


@dataclass(frozen=True)
class Memory:
    """Bytes per device; `peak` is not the plain sum when gradients and activations don't coexist."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    peak: float


def memory(
    config: Config, params: ParamCounts, strategy: str, *, devices: int, checkpointing: bool, cpu: bool
) -> Memory:
    """Per-device memory of one training step under `strategy` (none, ddp, fsdp) on `devices` devices."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    m, t = config.model, config.train
    # under DDP/FSDP train.batch_size is the global micro-batch: each device takes its share (trainer.py)
    micro_batch = t.batch_size if strategy == "none" else math.ceil(t.batch_size / devices)
    acts = activation_bytes(m, t.dtype, micro_batch, cpu=cpu, checkpointing=checkpointing)
    weights, gradients, optimizer = FP32 * params.total, FP32 * params.total, optimizer_bytes(config, params)
    c = compute_bytes(t.dtype)
    if strategy == "fsdp":
        weights, gradients, optimizer = weights / devices, gradients / devices, optimizer / devices
        # unsharded in the compute dtype (FSDP2's mixed precision): the root's parameters for the whole
        # step, two blocks (one prefetched); their unsharded gradients before the reduce-scatter
        buffers = c * (params.root + 2 * params.per_block) + FP32 * (params.root + params.per_block)
    else:
        # autocast's bf16 weight copies, saved for backward; with checkpointing they are dropped when the
        # forward's autocast ends, and backward recasts one block's at a time (the head's stay saved)
        linear = params.linear
        if checkpointing:
            linear -= (m.n_layer - 1) * params.linear_per_block
        buffers = float(2 * linear if t.dtype != "fp32" else 0)
        if strategy == "ddp":
            buffers += FP32 * params.total  # gradient buckets (gradient_as_bucket_view=False, the default)
    if t.objective == "dpo":  # the frozen reference: a whole fp32 copy on every device (run.build_objective)
        weights += FP32 * params.total
    # backward frees activations block by block while it allocates the gradients: the peak is at its start,
    # or while it does the last block (L), with the root's gradients, or the first, with all of them
    last = m.n_layer * acts.per_block + acts.working
    first = acts.per_block + acts.working
    if t.grad_accum_steps == 1:  # gradients are freed after each update (zero_grad(set_to_none=True))
        dynamic = max(acts.peak, last + gradients * params.root / params.total, first + gradients)
    else:  # the previous micro-batches' gradients are alive throughout
        dynamic = gradients + acts.peak
    # dpo: the reference's forward runs while the policy's activations are saved, a block's tensors at a time
    if t.objective == "dpo":
        dynamic = max(dynamic, acts.peak + block_activation_bytes(m, t.dtype, micro_batch, cpu=cpu))
    peak = weights + optimizer + buffers + dynamic
    return Memory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=acts.peak,
        buffers=buffers,
        peak=peak,
    )


def training_seconds(
    tokens: float, flops_per_token: float, *, devices: int, peak_flops: float, mfu: float
) -> float:
    """Wall time to train on `tokens` tokens at `mfu` of `devices` devices' peak."""
    return tokens * flops_per_token / (devices * peak_flops * mfu)


def resolve_vocab_size(config: Config) -> int:
    """model.vocab_size, else the prepared data's (or the fine-tuning tokenizer's) vocabulary."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    from lmforge.data.tokenizer import load_tokenizer, vocab_size

    data = Path(config.data.dir) if config.data.dir else None
    if config.data.kind == "tokens" and data is not None and (data / "meta.json").is_file():
        from lmforge.data.loader import PreparedData

        return PreparedData.open(data).vocab_size
    tokenizer = Path(config.data.tokenizer) if config.data.kind == "sft" and config.data.tokenizer else None
    if tokenizer is None and data is not None and (data / "tokenizer.json").is_file():
        tokenizer = data / "tokenizer.json"
    if tokenizer is not None and tokenizer.is_file():
        return vocab_size(load_tokenizer(tokenizer))
    where = f"data.dir {config.data.dir!r} has no prepared data" if config.data.dir else "data.dir is not set"
    raise LmforgeError(f"model.vocab_size is not set and {where}; set it, e.g. --set model.vocab_size=50304")


@dataclass(frozen=True)
class Estimate:
    """Everything `lmforge estimate` prints; `as_dict` is its JSON."""

    params: ParamCounts
    model: ModelConfig  # the architecture estimated: train.init_from's, with the vocabulary resolved
    devices: int
    device_type: str
    dtype: str
    micro_batch: int
    block_size: int
    attention: str  # model.attention: causal attention's FLOPs are half the score matrix's
    optimizer: str
    memory: dict[str, Memory]  # keys: none, none+ac, ddp, ddp+ac, fsdp, fsdp+ac
    peak_flops: float
    peak_flops_source: str
    peak_measured: bool  # a matmul timed here (CPU), not a datasheet's: no MFU as the field means it
    mfu: float
    budget_tokens: float
    budget_source: str
    budget_seconds: float
    budget_seconds_ac: float
    chinchilla_tokens: float
    chinchilla_seconds: float
    # one device, no parallelism: "full", then "lora fp32", "lora bf16", "lora int8", "lora nf4"
    finetune: dict[str, Memory] = dataclasses.field(default_factory=dict)
    finetune_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # the budget's time
    lora_rank: int = 0  # of the LoRA rows: lora.rank, else FINETUNE_LORA_RANK
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """Every field, nested dataclasses included, as plain dicts (the `--json` output)."""
        return asdict(self)


def estimate(
    config: Config,
    *,
    devices: int = 1,
    device_type: str = "cpu",
    mfu: float = 0.4,
    tokens: float | None = None,
    peak_flops: float | None = None,
    seq_len: int | None = None,
) -> Estimate:
    """Estimate a run of `config` on `devices` devices of `device_type`, its sequences `seq_len`
    tokens long (default model.block_size); see the module docstring."""
    _check_arguments(devices, device_type, mfu, tokens=tokens, peak_flops=peak_flops)
    config, notes = _settle(config, device_type, seq_len)
    params = count_parameters(config.model)
    t, cpu = config.train, device_type == "cpu"
    table = {}
    for strategy in STRATEGIES:
        table[strategy] = memory(config, params, strategy, devices=devices, checkpointing=False, cpu=cpu)
        table[f"{strategy}+ac"] = memory(
            config, params, strategy, devices=devices, checkpointing=True, cpu=cpu
        )
    peak = _peak(peak_flops, device_type, t.dtype)
    tokens, budget = _token_budget(tokens, config)
    seconds = training_seconds(
        tokens, params.flops_per_token, devices=devices, peak_flops=peak.flops, mfu=mfu
    )
    chinchilla = float(CHINCHILLA_TOKENS_PER_PARAM * params.total)
    finetune, finetune_seconds, rank = _finetune_table(
        config, params, tokens=tokens, seconds=seconds, cpu=cpu
    )
    return Estimate(
        params=params,
        model=config.model,
        devices=devices,
        device_type=device_type,
        dtype=t.dtype,
        micro_batch=t.batch_size,
        block_size=config.model.block_size,
        attention=config.model.attention,
        optimizer=config.optim.name,
        memory=table,
        peak_flops=peak.flops,
        peak_flops_source=peak.source,
        peak_measured=peak.measured,
        mfu=mfu,
        budget_tokens=tokens,
        budget_source=budget,
        budget_seconds=seconds,
        budget_seconds_ac=seconds * (1 + params.recompute_flops_per_token / params.flops_per_token),
        chinchilla_tokens=chinchilla,
        chinchilla_seconds=training_seconds(
            chinchilla, params.flops_per_token, devices=devices, peak_flops=peak.flops, mfu=mfu
        ),
        finetune=finetune,
        finetune_seconds=finetune_seconds,
        lora_rank=rank,
        notes=(*notes, *_split_notes(t.batch_size, devices)),
    )


def _split_notes(batch_size: int, devices: int) -> list[str]:
    """Where the micro-batch does not split evenly: `train` under torchrun refuses such a run."""
    if devices == 1 or batch_size % devices == 0:
        return []
    share = math.ceil(batch_size / devices)
    return [
        f"train.batch_size {batch_size} does not split over {devices} devices: `lmforge train` refuses "
        f"it under DDP/FSDP (make it a multiple of {devices}); their rows take {share} sequences a device"
    ]


def _finetune_table(
    config: Config, params: ParamCounts, *, tokens: float, seconds: float, cpu: bool
) -> tuple[dict[str, Memory], dict[str, float], int]:
    """Full fine-tuning and LoRA on each base precision, on one device: memory and the budget's time
    (LoRA's FLOPs in proportion to full training's), and the LoRA rank they assume."""
    lora = config.lora if config.lora.rank > 0 else dataclasses.replace(config.lora, rank=FINETUNE_LORA_RANK)
    counts = count_lora(config.model, lora, params)
    ac = config.train.activation_checkpointing
    table = {"full": memory(config, params, "none", devices=1, checkpointing=ac, cpu=cpu)}
    if ac:  # one more forward of the blocks
        seconds *= 1 + params.recompute_flops_per_token / params.flops_per_token
    times = {"full": seconds}
    for base_dtype in BASE_BYTES:
        table[f"lora {base_dtype}"] = lora_memory(config, params, counts, base_dtype=base_dtype, cpu=cpu)
        times[f"lora {base_dtype}"] = seconds * counts.flops_per_token / params.flops_per_token
    return table, times, lora.rank


def _check_arguments(
    devices: int, device_type: str, mfu: float, *, tokens: float | None, peak_flops: float | None
) -> None:
    if device_type not in DEVICE_TYPES:
        raise LmforgeError(f"--device-type must be one of {', '.join(DEVICE_TYPES)}; got {device_type!r}")
    if not 0 < mfu <= 1:
        raise LmforgeError(f"--mfu must be in (0, 1], got {mfu}")
    if devices < 1:
        raise LmforgeError(f"--devices must be at least 1, got {devices}")
    if tokens is not None and not (tokens > 0 and math.isfinite(tokens)):
        raise LmforgeError(f"--tokens must be positive, got {tokens}")
    if peak_flops is not None and not (peak_flops > 0 and math.isfinite(peak_flops)):
        raise LmforgeError(f"--peak-flops must be positive, got {peak_flops}")


def _settle(config: Config, device_type: str, seq_len: int | None = None) -> tuple[Config, list[str]]:
    """A copy of `config` with the model `train` would build (sequences of `seq_len` tokens if given)
    and the dtype it would run in on `device_type`; and notes on what the estimate assumes."""
    notes, model = [], config.model
    if config.train.init_from:
        from lmforge import checkpoint as ckpt

        source = ckpt.resolve_checkpoint(Path(config.train.init_from), "best")
        model = ckpt.init_model_config(source, model)
        notes.append(f"architecture of train.init_from {source}")
    if seq_len is not None:
        if seq_len < 1:
            raise LmforgeError(f"--seq-len must be a positive number of tokens, got {seq_len}")
        model = dataclasses.replace(model, block_size=seq_len)
    if config.lora.rank > 0:
        notes.append("the strategy table is full training's; LoRA's memory is in the fine-tuning table")
    vocab_size = resolve_vocab_size(dataclasses.replace(config, model=model))
    train = config.train
    if train.objective != "lm":  # a batch of n pairs is 2n sequences, chosen and rejected (data.preference)
        train = dataclasses.replace(train, batch_size=2 * train.batch_size)
        reference = (
            "; dpo's frozen reference: an fp32 copy in full training, its forward's memory counted as a "
            "block's saved tensors (an upper bound), its FLOPs not in the times"
            if train.objective == "dpo"
            else ""
        )
        notes.append(
            f"train.objective {train.objective}: a micro-batch of {config.train.batch_size} pairs is "
            f"{train.batch_size} sequences{reference}"
        )
    dtype = "fp32" if config.privacy.enabled else train.dtype  # as the trainer: DP-SGD runs in fp32
    if dtype == "auto":  # what the trainer would pick: the listed GPUs all have bf16
        dtype = resolve_dtype("auto", torch.device("cpu")) if device_type == "cpu" else "bf16"
        notes.append(f"train.dtype auto is {dtype} on {device_type}")
    model = dataclasses.replace(model, vocab_size=vocab_size)
    train = dataclasses.replace(train, dtype=dtype)
    return dataclasses.replace(config, model=model, train=train), notes


def _peak(given: float | None, device_type: str, dtype: str) -> Peak:
    """Peak FLOP/s of one device: given, measured (CPU, as training measures it) or a datasheet's."""
    if given is not None:
        return Peak(given, "given", measured=False)
    if device_type == "cpu":
        return device_peak(torch.device("cpu"), "fp32" if dtype == "fp32" else "bf16")
    return Peak(
        DEVICE_PEAK_FLOPS[device_type][dtype], f"{device_type} {dtype} dense, datasheet", measured=False
    )


def _token_budget(tokens: float | None, config: Config) -> tuple[float, str]:
    """The tokens to train on and where the number comes from: --tokens, else the run's length."""
    if tokens is not None:
        return tokens, "--tokens"
    t = config.train
    tokens = float(t.max_steps * t.batch_size * t.grad_accum_steps * config.model.block_size)
    # a preference objective's batch_size counts pairs; `_settle` made it the sequences, twice as many
    batch = (
        f"batch_size {t.batch_size}" if t.objective == "lm" else f"batch_size {t.batch_size // 2} x 2 sides"
    )
    budget = (
        f"train.max_steps {t.max_steps} x {batch} x grad_accum_steps "
        f"{t.grad_accum_steps} x block_size {config.model.block_size}"
    )
    return tokens, budget


def format_bytes(n: float) -> str:
    """A byte count in the largest binary unit it reaches, e.g. 1.50 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """Seconds in the largest unit they reach: days, h, min or s."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def attention_count(attention: str) -> str:
    """Attention's share of the FLOPs per token, in words (`lmforge.model.gpt.attention_flops`)."""
    if attention == "causal":
        return "6 x layers x d_model x block_size: causal, half the score matrix"
    return "12 x layers x d_model x block_size: bidirectional, the whole score matrix"


def format_table(e: Estimate) -> str:
    """The human-readable report: counts, a memory table (rows: parts; columns: strategies ± AC), times."""
    p = e.params
    lines = [
        f"parameters        {p.total:,} (exact, from the model)",
        f"FLOPs per token   {p.flops_per_token:,.0f} "
        f"(training: 6 x matmul params + {attention_count(e.attention)})",
        f"micro-batch       {e.micro_batch} x {e.block_size} = {e.micro_batch * e.block_size:,} tokens "
        f"(DDP/FSDP: split over the devices); "
        f"{e.devices} x {e.device_type}, {e.dtype}, {e.optimizer}",
        "",
        f"memory per device {''.join(f'{k:>12}' for k in e.memory)}",
    ]
    for row in ("weights", "gradients", "optimizer", "activations", "buffers", "peak"):
        lines.append(
            f"{row:<18}" + "".join(f"{format_bytes(getattr(m, row)):>12}" for m in e.memory.values())
        )
    lines += [
        "+ac: activation checkpointing per block. activations: their peak, early in backward. "
        "buffers: bf16 autocast",
        "copies, DDP gradient buckets, FSDP unsharded units. "
        "peak: the step's highest point, not the sum of the",
        "rows: backward frees activations as it makes gradients, and recomputes a block at a time with +ac.",
        "",
        f"time at {Peak(e.peak_flops, e.peak_flops_source, e.peak_measured).name} {e.mfu:.0%} of "
        f"{e.devices} x {format_flops(e.peak_flops)} ({e.peak_flops_source}):",
        f"  budget      {e.budget_tokens:,.0f} tokens ({e.budget_source}): "
        f"{format_duration(e.budget_seconds)}"
        f" ({format_duration(e.budget_seconds_ac)} with activation checkpointing)",
        f"  Chinchilla  {e.chinchilla_tokens:,.0f} tokens ({CHINCHILLA_TOKENS_PER_PARAM} per parameter): "
        f"{format_duration(e.chinchilla_seconds)}",
        "",
        *format_finetune(e),
        *(f"note: {note}" for note in e.notes),
    ]
    return "\n".join(lines)


def format_finetune(e: Estimate) -> list[str]:
    """The fine-tuning table: full and LoRA (rank e.lora_rank) on each base precision, one device."""
    lines = [f"fine-tuning, 1 device {''.join(f'{k:>12}' for k in e.finetune)}"]
    for row in ("weights", "gradients", "optimizer", "activations", "buffers", "peak"):
        lines.append(
            f"{row:<22}" + "".join(f"{format_bytes(getattr(m, row)):>12}" for m in e.finetune.values())
        )
    lines.append(
        f"{'budget time':<22}" + "".join(f"{format_duration(s):>12}" for s in e.finetune_seconds.values())
    )
    lines += [
        f"lora X: rank-{e.lora_rank} adapters (lora.targets), the base held in X (lora.base_dtype);",
        "activation checkpointing as train.activation_checkpointing; no FLOPs for frozen weights' gradients.",
        "",
    ]
    return lines


def estimate_report(config_file: str, overrides: list[str], as_json: bool = False, **options: object) -> str:
    """`lmforge estimate`: what it prints for a config file with overrides (`options`: see `estimate`)."""
    folder = Path(config_file)
    if folder.is_dir():  # a run or checkpoint folder (e.g. from `lmforge import`): fine-tune it
        config = load_config(None, [f"train.init_from={folder}", *overrides], origin=config_file)
    else:
        config = load_config(config_path(config_file), overrides, origin=config_file)
    result = estimate(config, **options)
    if as_json:
        return json.dumps({"config": config_file, **result.as_dict()})
    m = result.model
    header = f"{config_file}: {m.n_layer} layers, d_model {m.d_model}, vocab {m.vocab_size}"
    return f"{header}\n{format_table(result)}"


# ------------------------------------------------------------------ measured, to check the estimate


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`, a quantized tensor's inner tensors counted."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        names = tensor.__tensor_flatten__()[0] if hasattr(tensor, "__tensor_flatten__") else None
        for part in [getattr(tensor, name) for name in names] if names else [tensor]:
            storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
    return sum(storages.values())


def resident_bytes(stepper: Stepper) -> int:
    """Bytes of what a training step keeps between steps: weights, buffers and optimizer state."""
    model, optimizers = stepper.model, stepper.optimizers
    state = [v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes([*model.parameters(), *model.buffers(), *state])


def measured_step_peak(stepper: Stepper, batches: Iterator) -> int:
    """Peak tensor bytes of one CPU training step: the weights, buffers and optimizer state alive
    before it, plus the highest running sum of the profiler's allocations and frees during it. Run a
    step first, so that the optimizer's state exists (a steady step, as `memory` estimates)."""
    gc.collect()
    baseline = resident_bytes(stepper)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper.gradients(batches)
        stepper.update()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = highest = 0
    for _, nbytes in events:
        running += nbytes
        highest = max(highest, running)
    return baseline + highest


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind `tensor`: its own, or a quantized tensor's inner tensors' (recursively)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor.untyped_storage()]
    return [s for name in tensor.__tensor_flatten__()[0] for s in _storages(getattr(tensor, name))]


def _is_weight_copy(tensor: torch.Tensor, frozen: list[torch.Tensor]) -> bool:
    """Whether `tensor` is autocast's lower-precision copy of a parameter (maybe transposed): a buffer,
    not an activation. A learning parameter's copy leads back to its AccumulateGrad through t() and
    casts; a frozen one's has no history, so it is told by its values."""
    fn = tensor.grad_fn
    while fn is not None and fn.name() in ("TBackward0", "ToCopyBackward0"):
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
        if fn is not None and fn.name() == "torch::autograd::AccumulateGrad":
            return True
    if tensor.grad_fn is not None or tensor.dim() not in (1, 2):
        return False
    for weight in frozen:
        if weight.dtype == tensor.dtype or weight.numel() != tensor.numel():
            continue
        for view in (tensor, tensor.mT) if tensor.dim() == 2 else (tensor,):
            if view.shape == weight.shape and torch.equal(view, weight.to(tensor.dtype)):
                return True
    return False


def measured_saved_bytes(model: nn.Module, tokens: torch.Tensor, dtype: str) -> int:
    """Bytes of the distinct storages that autograd saves in one training forward of `model` (a GPT,
    LoRA-wrapped or not) on CPU in `dtype`, on `tokens` [B, T] as input and targets: what
    `saved_activation_bytes` estimates. Parameters, buffers and autocast's copies of parameters are
    left out (the estimate's weights and buffers)."""
    resident = [*model.parameters(), *model.buffers()]
    skip = {s.data_ptr() for t in resident for s in _storages(t)}
    frozen = [p for p in model.parameters() if not p.requires_grad and not hasattr(p, "__tensor_flatten__")]
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages = [s for s in _storages(tensor) if s.data_ptr() not in skip]
        if storages and not _is_weight_copy(tensor, frozen):
            saved.update((s.data_ptr(), s.nbytes()) for s in storages)
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), dtype):
        model(tokens, tokens.clone())
    return sum(saved.values())
