"""Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch

from lmforge.model.gpt import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    *,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # From the largest logit down, so that a tiny temperature cannot overflow to inf (inf - inf: NaN
    # probabilities); below float32's smallest normal number the division would be by 0: as T -> 0,
    # sampling tends to the argmax (a tie shared at random), which the smallest one already gives.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and the likeliest token always (a top_p that float32 rounds to 0 kept none)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_tokens: Collection[int] = (),
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] one step at a time, continuing `prompt` [B, T].

    The prompt is processed once into the KV cache; each later step feeds only the new
    token. When the context reaches block_size the cache is rebuilt from the last half (at least
    the newest token).
    It ends early once every row's token is one of `stop_tokens` (that token is yielded).
    """
    block_size = model.config.block_size
    tokens = prompt[:, -block_size:]
    cache = KVCache.allocate(model, prompt.size(0), block_size)
    stops = torch.tensor(sorted(stop_tokens), device=prompt.device) if stop_tokens else None
    logits, _ = model(tokens, cache=cache)
    for _ in range(max_new_tokens):
        next_token = sample_next(logits[:, -1], temperature, top_k, top_p=top_p, generator=generator)
        yield next_token[:, 0]
        if stops is not None and bool(torch.isin(next_token, stops).all()):
            return
        tokens = torch.cat([tokens, next_token], dim=1)
        if cache.length == block_size:
            # at least the newest token: block_size 1 (a bigram model) keeps it, not `[-0:]`, everything
            tokens = tokens[:, -max(block_size // 2, 1) :]
            cache.length = 0
            logits, _ = model(tokens, cache=cache)
        else:
            logits, _ = model(next_token, cache=cache)


@torch.inference_mode()
def beam_search(
    model: GPT,
    prompt: torch.Tensor,
    beam_size: int,
    *,
    max_new_tokens: int,
    stop_tokens: set[int],
    length_penalty: float = 1.0,
) -> list[int]:
    """The highest-scoring continuation of `prompt` [1, T] (log-probability / length**length_penalty).

    Beams share one KV cache whose rows are reordered as beams are chosen; a beam ends when it
    emits a stop token or reaches max_new_tokens.
    """
    room = model.config.block_size - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in block_size")
    prompt = prompt[:, -room:]
    cache = KVCache.allocate(model, beam_size, prompt.size(1) + max_new_tokens)
    logits, _ = model(prompt.expand(beam_size, -1).contiguous(), cache=cache)
    scores = torch.full((beam_size,), float("-inf"), device=prompt.device)
    scores[0] = 0.0  # the beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(beam_size)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        candidates = (scores[:, None] + log_probs).flatten()
        top_scores, top_ids = candidates.topk(min(2 * beam_size, candidates.numel()))
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top_scores.tolist(), top_ids.tolist()):
            if score == float("-inf"):
                break
            row, token = divmod(flat, log_probs.size(1))
            tokens = beams[row] + [token]
            if token in stop_tokens or step == max_new_tokens - 1:
                finished.append(
                    (score / len(tokens) ** length_penalty, tokens[:-1] if token in stop_tokens else tokens)
                )
            elif len(keep_rows) < beam_size:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
            if len(keep_rows) == beam_size:
                break
        best_finished = max((s for s, _ in finished), default=float("-inf"))
        if not keep_rows or (
            len(finished) >= beam_size and best_finished >= max(keep_scores) / (step + 1) ** length_penalty
        ):
            break
        index = torch.tensor(keep_rows, device=prompt.device)
        cache.keys = [k.index_select(0, index) for k in cache.keys]
        cache.values = [v.index_select(0, index) for v in cache.values]
        beams = [beams[r] + [t] for r, t in zip(keep_rows, keep_tokens)]
        scores = torch.tensor(keep_scores, device=prompt.device)
        logits, _ = model(torch.tensor(keep_tokens, device=prompt.device)[:, None], cache=cache)
    return max(finished, key=lambda f: f[0])[1] if finished else beams[0]
