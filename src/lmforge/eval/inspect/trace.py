"""What a model computes on one prompt, read from inside its forward pass.

- attention probabilities of every layer and head, computed from the q and k that each
  `Attention` module hands to its `capture` hook (the fused kernel never returns them), and
  checked against the module's own output;
- the residual stream before the first block and after every block, read out through the
  model's final norm and head (`GPT.readout`): the logit lens;
- the model's logits, and from them the surprisal of each token and the top-k next tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.model.gpt import GPT


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim)) under the causal mask, in fp32: what
    `F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)` computes inside. A layer's own
    `scale`, soft-cap and sliding `window` (`Attention.scale`, `.softcap`, `.window`) where it has them.

    q: (B, n_head, T, head_dim); k: (B, n_kv_head, S, head_dim), S >= T (the last T keys are the
    queries' own positions). Returns (B, n_head, T, S); every row sums to one.
    """
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # GQA: query head h reads kv head h // group
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q.float() @ k.float().transpose(-2, -1) * scale  # (B, n_head, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    T, S = scores.shape[-2:]
    seen = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if window is not None:  # and no further back than window - 1 positions
        seen &= ~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T - window)
    return scores.masked_fill(~seen, -math.inf).softmax(dim=-1)


def attention_output(attention: torch.nn.Module, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention module's output rebuilt from `probs` (B, n_head, T, S) and its values
    v (B, n_kv_head, S, head_dim): heads side by side, then the output projection. (B, T, d_model)"""
    v = v.float().repeat_interleave(probs.size(1) // v.size(1), dim=1)  # (B, n_head, S, head_dim)
    y = (probs @ v).transpose(1, 2).flatten(2)  # (B, T, n_head * head_dim)
    return attention.proj(y.to(attention.proj.weight.dtype))


@dataclass
class Recording:
    """What the hooks saw during one forward pass, per layer in order."""

    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    attention_out: list[torch.Tensor] = field(default_factory=list)  # (B, T, d_model) each
    residual: list[torch.Tensor] = field(default_factory=list)  # block inputs of layer 0, then outputs


@contextmanager
def recording(model: GPT) -> Iterator[Recording]:
    """Record q/k/v, attention outputs and the residual stream of `model` while the body runs;
    every hook is removed afterwards, so the model is left as it was."""
    seen = Recording()
    handles = [model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.residual.append(args[0]))]
    for block in model.blocks:
        block.attn.capture = lambda q, k, v: seen.qkv.append((q, k, v))
        handles.append(block.attn.register_forward_hook(lambda _m, _a, out: seen.attention_out.append(out)))
        handles.append(block.register_forward_hook(lambda _m, _a, out: seen.residual.append(out)))
    try:
        yield seen
    finally:
        for block in model.blocks:
            block.attn.capture = None
        for handle in handles:
            handle.remove()


def logit_lens(model: GPT, residual: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each residual stream (B, T, d_model) read out as the model reads its last one: final norm,
    head and soft-cap (`GPT.readout`). One (B, T, V) fp32 tensor at a time: all of them at once
    would be layers x tokens x vocabulary, gigabytes for a large model."""
    for x in residual:
        yield model.readout(x).float()


@dataclass(frozen=True)
class Lens:
    """What the logit lens shows, per row (the embeddings, then each block's output) and position."""

    probs: torch.Tensor  # (L + 1, T, k): the k likeliest next tokens' probabilities, sorted
    ids: torch.Tensor  # (L + 1, T, k): their ids
    ranks: torch.Tensor  # (L + 1, T - 1): tokens scored above the prompt's next token (0: it is the top)

    @classmethod
    def of(cls, rows: Iterator[torch.Tensor], ids: list[int], k: int) -> Lens:
        """From lens logits (T, V) per row, one row at a time, and the prompt `ids`."""
        target = torch.tensor(ids[1:]).unsqueeze(-1)  # (T - 1, 1)
        probs, top, ranks = [], [], []
        for logits in rows:
            best = logits.softmax(-1).topk(min(k, logits.size(-1)), dim=-1)
            correct = logits[:-1].gather(-1, target.to(logits.device))  # (T - 1, 1)
            probs.append(best.values.cpu())
            top.append(best.indices.cpu())
            ranks.append((logits[:-1] > correct).sum(-1).cpu())
        return cls(torch.stack(probs), torch.stack(top), torch.stack(ranks))


@dataclass(frozen=True)
class Trace:
    """One prompt through the model. T tokens, L layers, H heads, V the vocabulary."""

    ids: list[int]  # the prompt's tokens
    logits: torch.Tensor  # (T, V) fp32: the model's own output
    attention: list[torch.Tensor]  # L of (H, T, T) fp32: row i is query i's weights over keys 0..T-1
    lens: Lens  # its last row is the model's own logits
    attention_error: float  # max |rebuilt - actual| attention output, over layers

    @property
    def surprisal(self) -> torch.Tensor:
        """(T - 1,) nats: -log p(token i + 1 | tokens 0..i), the per-token loss of the forward."""
        return F.cross_entropy(self.logits[:-1], torch.tensor(self.ids[1:]), reduction="none")

    @property
    def ranks(self) -> torch.Tensor:
        """(T - 1,): the model's rank of each next token of the prompt (0: its top prediction)."""
        return self.lens.ranks[-1]

    def top_k(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's k likeliest next tokens at each position: probabilities and ids, (T, k) each."""
        return self.lens.probs[-1], self.lens.ids[-1]


@torch.no_grad()
def trace(
    model: GPT, ids: list[int], k: int = 5, *, autocast: contextlib.AbstractContextManager | None = None
) -> Trace:
    """Run `ids` (at most block_size tokens) through `model` once and read out everything `Trace`
    holds, with the `k` likeliest next tokens per lens row and position."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    with recording(model) as seen:
        with autocast or contextlib.nullcontext():  # the lens in the precision of the model's logits
            logits, _ = model(idx)
            lens = Lens.of((row[0] for row in logit_lens(model, seen.residual)), ids, k)
        attention, error = [], 0.0
        for layer, (q, key, v) in enumerate(seen.qkv):  # fp32 maths: autocast would redo it in bf16
            attn = model.blocks[layer].attn
            probs = attention_probabilities(
                q, key, scale=attn.scale, softcap=attn.softcap, window=attn.window
            )
            rebuilt = attention_output(model.blocks[layer].attn, probs, v)
            error = max(error, (rebuilt.float() - seen.attention_out[layer].float()).abs().max().item())
            attention.append(probs[0].cpu())
    return Trace(ids, logits[0].float().cpu(), attention, lens, error)
