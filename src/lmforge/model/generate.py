"""Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.model.gpt import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] one step at a time, continuing `prompt` [B, T].

    The prompt is processed once into the KV cache; each later step feeds only the new
    token. When the context reaches block_size the cache is rebuilt from the last half.
    """
    block_size = model.config.block_size
    tokens = prompt[:, -block_size:]
    cache = KVCache.allocate(model, prompt.size(0), block_size)
    logits, _ = model(tokens, cache=cache)
    for _ in range(max_new_tokens):
        next_token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        yield next_token[:, 0]
        if stop_token is not None and bool((next_token == stop_token).all()):
            return
        tokens = torch.cat([tokens, next_token], dim=1)
        if cache.length == block_size:
            tokens = tokens[:, -(block_size // 2) :]
            cache.length = 0
            logits, _ = model(tokens, cache=cache)
        else:
            logits, _ = model(next_token, cache=cache)
