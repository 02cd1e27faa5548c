import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import GPT, KVCache, gpt
from lmforge.model.gpt import Attention, Rotary, rope_frequencies


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, block_size=16, vocab_size=50)
    return ModelConfig(**(base | overrides))


OPTIONS = [
    {},
    {
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "qk_norm": True,
        "tie_embeddings": False,
        "bias": False,
    },
    {"n_kv_head": 2, "mlp": "relu2"},
    {"n_kv_head": 1, "position": "rope"},
    {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "sliding_window": 4},
    GEMMA := {  # Gemma 2's and 3's options together; the window is shorter than the tests' sequences
        "position": "rope",
        "norm": "rmsnorm1p",
        "mlp": "geglu",
        "qk_norm": True,
        "post_norms": True,
        "embed_scale": True,
        "n_kv_head": 2,
        "head_dim": 12,
        "attn_scale_dim": 20,
        "attn_softcap": 3.0,
        "logit_softcap": 30.0,
        "sliding_window": 4,
        "global_every": 2,
        "rope_local_theta": 100.0,
        "rope_scaling": "linear",
        "rope_factor": 2.0,
        "bias": False,
    },
]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k) + causal mask) V, written out."""
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)
    T, S = q.size(-2), k.size(-2)
    future = torch.ones(T, S, dtype=torch.bool).triu(diagonal=S - T + 1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("options", [{}, {"n_kv_head": 2}, {"qk_norm": True, "position": "rope"}])
def test_attention_matches_the_formula(options: dict) -> None:
    torch.manual_seed(0)
    config = tiny(**options)
    attn = Attention(config, layer=0).eval()
    rotary = Rotary(rope_frequencies(config), 16) if config.position == "rope" else None
    x = torch.randn(3, 10, 32)
    # Recompute the same projections by hand and apply the formula per head.
    n_kv = config.n_kv_head or 4
    q, k, v = attn.qkv(x).split([32, n_kv * 8, n_kv * 8], dim=-1)
    q = q.view(3, 10, 4, 8).transpose(1, 2)
    k = k.view(3, 10, n_kv, 8).transpose(1, 2)
    v = v.view(3, 10, n_kv, 8).transpose(1, 2)
    if config.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rotary is not None:  # channel i of each half rotates with channel i + 4 by position * theta^(-i / 4)
        angles = torch.arange(10.0)[:, None] * 10000.0 ** (-torch.arange(4.0) / 4)  # (T, 4)
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (T, head_dim)
        q, k = (t * cos + torch.cat((-t[..., 4:], t[..., :4]), dim=-1) * sin for t in (q, k))
    k, v = k.repeat_interleave(4 // n_kv, dim=1), v.repeat_interleave(4 // n_kv, dim=1)
    expected = attn.proj(explicit_attention(q, k, v).transpose(1, 2).reshape(3, 10, 32))
    rope = rotary.tables(0, 10) if rotary is not None else None
    torch.testing.assert_close(attn(x, rope, None), expected, rtol=1e-5, atol=1e-6)


def test_causal_no_peeking() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("options", OPTIONS)
def test_kv_cache_logits_equal_full_recompute(options: dict) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(**options)).eval()
    idx = torch.randint(0, 50, (2, 16))
    full, _ = model(idx)
    cache = KVCache.allocate(model, 2, 16)
    pieces = [model(idx[:, :5], cache=cache)[0]]  # prefill, then a chunk, then one token at a time
    pieces.append(model(idx[:, 5:9], cache=cache)[0])
    pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS)
def test_every_option_trains(options: dict) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(**options))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(50), rel=0.1)  # ~uniform at init
    assert losses[-1] < 0.5 * losses[0]


def test_options_change_the_architecture() -> None:
    gqa = GPT(tiny(n_kv_head=1))
    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2) * 8, 32)
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.head.weight is not untied.embed.weight
    tied = GPT(tiny())
    assert tied.head.weight is tied.embed.weight
    assert GPT(tiny(position="rope")).pos_embed is None
    assert isinstance(GPT(tiny(norm="rmsnorm")).norm, torch.nn.RMSNorm)
    assert GPT(tiny(mlp="swiglu")).blocks[0].mlp.up.weight.shape == (2 * 128, 32)
    assert GPT(tiny(bias=False)).blocks[0].attn.qkv.bias is None


def test_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=256, n_head=4))
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_param_count_matches_nanogpt_and_flops_count_the_matmuls() -> None:
    config = ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=64, vocab_size=65)
    model = GPT(config)
    d, L, V, T = 128, 4, 65, 64
    per_layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert model.num_params() == V * d + T * d + L * per_layer + 2 * d
    matrices = V * d + L * (3 * d * d + d * d + 4 * d * d + 4 * d * d)  # nanoGPT's 6N counts biases too
    assert model.flops_per_token() == 6 * matrices + 6 * L * d * T  # causal: half of PaLM's 12·L·d·T


def measured_flops(model: GPT, idx: torch.Tensor, targets: torch.Tensor, only_targets: bool) -> int:
    """What torch's FLOP counter sees in a forward and backward (attention as explicit matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets, only_targets=only_targets)
        loss.backward()
    return counter.get_total_flops()


def masked_half(model: GPT, batch: int, seq_len: int) -> int:
    """The score-matrix FLOPs (forward and backward) above the causal diagonal, which the MATH
    backend computes and masks, and the causal kernels training runs skip: 6·L·d·T per token."""
    config = model.config
    return 6 * config.n_layer * config.n_head * gpt.head_size(config) * seq_len * batch * seq_len


@pytest.mark.parametrize("options", [*OPTIONS, {"attention": "bidirectional"}])
def test_training_flops_equal_torch_flop_counter_but_for_the_masked_half(options: dict) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(**options))
    idx, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    measured = measured_flops(model, idx, targets, only_targets=False)
    # On purpose, causal attention is counted as flash attention executes it, not as the MATH
    # backend that the counter needs does (the full matrix, then a mask); bidirectional is the full one.
    skipped = masked_half(model, 3, 12) if model.config.attention == "causal" else 0
    assert model.training_flops(3, 12) == measured - skipped


def test_causal_attention_counts_half_of_the_full_score_matrix() -> None:
    from lmforge.model.gpt import attention_flops

    causal, full = (
        tiny(n_layer=3, d_model=64, n_head=4),
        tiny(n_layer=3, d_model=64, n_head=4, attention="bidirectional"),
    )
    assert attention_flops(full, 100) == 4 * 3 * 64 * 100  # QK^T and PV over the whole matrix
    assert attention_flops(causal, 100) == 2 * 3 * 64 * 100  # the half below the diagonal
    gap = GPT(full).training_flops(2, 100) - GPT(causal).training_flops(2, 100)
    assert gap == 3 * 2 * 3 * 64 * 100 * (2 * 100)  # forward and backward, every token; nothing else differs


def test_training_flops_count_the_head_where_it_runs_and_frozen_weights() -> None:
    from lmforge.model.heads import head_rows

    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=False, block_size=64))
    idx, targets = torch.randint(0, 50, (4, 40)), torch.randint(0, 50, (4, 40))
    targets[:, :30] = -100  # a masked prompt: the head runs at 40 rows, padded to ROW_MULTIPLE
    rows = head_rows(targets)
    assert rows == 128
    skipped = masked_half(model, 4, 40)  # as the test above
    assert model.training_flops(4, 40, rows) == measured_flops(model, idx, targets, True) - skipped
    model.head.weight.requires_grad_(False)  # a frozen weight: only its input's gradient
    assert model.training_flops(4, 40, rows) == measured_flops(model, idx, targets, True) - skipped
    assert model.training_flops(4, 40, rows) < model.training_flops(4, 40)


def test_zero_init_residual_starts_every_block_as_identity() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_residual=True))
    for block in model.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.down.weight.abs().sum() == 0
    x = torch.randn(2, 5, 32)
    assert torch.equal(model.blocks[0](x, None, None), x)
    assert GPT(tiny()).blocks[0].mlp.down.weight.abs().sum() > 0


def test_logit_softcap_bounds_the_logits() -> None:
    torch.manual_seed(0)
    plain, capped = GPT(tiny()), GPT(tiny(logit_softcap=0.5))
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50, (2, 8))
    raw, _ = plain(idx)
    logits, _ = capped(idx)
    assert logits.abs().max() < 0.5
    torch.testing.assert_close(logits, 0.5 * torch.tanh(raw / 0.5))


@pytest.mark.bf16
def test_bf16_autocast_attention_runs_in_fp32_on_cpu() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(qk_norm=True, position="rope"))
    idx = torch.randint(0, 50, (2, 16))
    reference, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_head_only_at_targets_gives_the_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(position="rope", logit_softcap=30.0))
    idx = torch.randint(0, 50, (3, 12))
    targets = torch.randint(0, 50, (3, 12))
    targets[:, :7] = -100  # a masked prompt
    targets[0, 10:] = -100  # padding
    results = []
    for only_targets in (False, True):
        model.zero_grad()
        logits, loss = model(idx, targets, only_targets=only_targets)
        loss.backward()
        results.append((logits, loss, [p.grad.clone() for p in model.parameters()]))
    (full_logits, full_loss, full_grads), (logits, loss, grads) = results
    assert logits.shape == (int((targets != -100).sum()), 50)
    torch.testing.assert_close(logits, full_logits[targets != -100])
    torch.testing.assert_close(loss, full_loss)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b)


def test_relu_squared_backward_matches_autograd() -> None:
    from lmforge.model.gpt import ReLUSquared

    x = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReLUSquared.apply, (x,))
    torch.testing.assert_close(ReLUSquared.apply(x), torch.relu(x) ** 2)


def test_relu_squared_mlp_without_autograd_matches_the_training_path() -> None:
    torch.manual_seed(0)
    mlp = gpt.MLP(tiny(mlp="relu2"))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():  # the in-place path
        evaluated = mlp(x)
    trained = mlp(x)  # ReLUSquared, with a graph
    assert trained.requires_grad and not evaluated.requires_grad
    torch.testing.assert_close(evaluated, trained.detach())
    torch.testing.assert_close(evaluated, mlp.down(torch.relu(mlp.up(x)) ** 2).detach())


@pytest.mark.parametrize(("position", "window"), [("rope", None), ("learned", None), ("rope", 3)])
def test_cache_rows_at_their_own_lengths_give_each_sequence_its_logits_alone(
    position: str, window: int | None
) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=2, n_head=2, n_kv_head=1, d_model=32, block_size=32, vocab_size=50, position=position,
        sliding_window=window,
    )  # fmt: skip
    model = GPT(config).eval()
    prompts = [torch.randint(50, (1, length)) for length in (3, 7, 5)]
    with torch.inference_mode():
        batched = KVCache.allocate(model, 3, 32)
        for row, prompt in enumerate(prompts):  # each prefilled alone into its row
            model(
                prompt,
                cache=KVCache(
                    [k[row : row + 1] for k in batched.keys], [v[row : row + 1] for v in batched.values]
                ),
            )
        batched.length = torch.tensor([3, 7, 5])
        next_tokens = torch.tensor([[1], [2], [3]])
        logits, _ = model(next_tokens, cache=batched)  # one step, every row at its own position
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.cat([prompt, next_tokens[row : row + 1]], dim=1))
            torch.testing.assert_close(logits[row, -1], alone[0, -1])
    assert batched.length.tolist() == [4, 8, 6]


def test_stale_keys_beyond_a_rows_length_are_never_seen() -> None:
    """A server's freed rows keep old keys past their new length: a batched step must mask them."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=32, vocab_size=50, position="rope")
    model = GPT(config).eval()
    prompts = [torch.randint(50, (1, length)) for length in (2, 9, 4)]
    with torch.inference_mode():
        batched = KVCache.allocate(model, 3, 32)
        for cached in (*batched.keys, *batched.values):
            cached.copy_(torch.randn_like(cached) * 100)  # garbage everywhere, as a previous request left it
        for row, prompt in enumerate(prompts):
            model(
                prompt,
                cache=KVCache(
                    [k[row : row + 1] for k in batched.keys], [v[row : row + 1] for v in batched.values]
                ),
            )
        batched.length, batched.longest = torch.tensor([2, 9, 4]), 9  # the longest known on the host
        next_tokens = torch.tensor([[1], [2], [3]])
        logits, _ = model(next_tokens, cache=batched)
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.cat([prompt, next_tokens[row : row + 1]], dim=1))
            torch.testing.assert_close(logits[row, -1], alone[0, -1])
    assert batched.length.tolist() == [3, 10, 5] and batched.longest == 10


def test_the_word_match_input_starts_at_zero_and_comes_from_targets_or_matched() -> None:
    from lmforge.targets import SPAN_MATCH, SPAN_OTHER, SPAN_START

    torch.manual_seed(0)
    plain = GPT(tiny(head="span"))
    model = GPT(tiny(head="span", word_match=True))
    model.load_state_dict(plain.state_dict() | {"match_embed.weight": model.match_embed.weight})
    x, matched = torch.randint(0, 50, (1, 8)), torch.tensor([[0, 1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(model(x, matched=matched)[0], plain(x)[0])  # zero: a fine-tune starts as its base
    torch.nn.init.normal_(model.match_embed.weight)
    y = torch.full((1, 8), SPAN_OTHER) | SPAN_MATCH * matched.long()
    y[0, 2] |= SPAN_START
    scores = model(x, matched=matched)[0]
    assert torch.equal(model(x, y)[0], scores) and not torch.allclose(scores, plain(x)[0])
    with pytest.raises(ValueError, match="word_match model reads `matched`"):
        model(x)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_bidirectional_attention_sees_later_tokens_but_never_padding(attention: str) -> None:
    from lmforge.targets import IGNORE_INDEX, SPAN_OTHER

    torch.manual_seed(0)
    model = GPT(tiny(head="span", attention=attention)).eval()
    x = torch.randint(0, 50, (1, 8))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 50
    earlier = (model(x)[0] - model(changed)[0])[0, :-1].abs().max()
    assert (earlier > 1e-3) == (attention == "bidirectional")  # the last token reaches the others
    padded = torch.cat([x, torch.full((1, 5), 7)], dim=1)
    y = torch.full((1, 13), SPAN_OTHER)
    y[0, 8:] = IGNORE_INDEX  # span targets mark the padding
    torch.testing.assert_close(model(padded, y)[0][:, :8], model(x)[0])


def test_a_span_model_costs_its_blocks_and_a_two_column_head() -> None:
    lm, span = GPT(tiny()), GPT(tiny(head="span"))
    d, V, T = 32, 50, 16
    assert span.training_flops(1, T) == lm.training_flops(1, T) - 6 * V * d * T + 6 * 2 * d * T


def test_a_span_heads_weights_train_with_adamw_and_an_unused_lm_head_is_frozen() -> None:
    from lmforge.train.optim import split_parameters

    model = GPT(tiny(head="span", tie_embeddings=False))
    assert not model.head.weight.requires_grad  # never used: no optimizer state, nothing for DDP to wait on
    embeddings = {id(p) for p in split_parameters(model)["embeddings"]}
    assert id(model.span_head.weight) in embeddings  # an output head: AdamW, never Muon's orthogonal updates


def test_a_sliding_window_hides_every_token_older_than_the_window() -> None:
    """Window 4 over 2 layers: position t depends on tokens t-6 .. t only (3 back per layer)."""
    torch.manual_seed(0)
    model = GPT(tiny(position="rope", norm="rmsnorm", mlp="swiglu", sliding_window=4)).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 50
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, 7:], b[:, 7:])
    assert not torch.allclose(a[:, 6], b[:, 6])  # token 0 still reaches position 6 through layer 1


def test_gemma_attention_matches_the_formula() -> None:
    """Scores scaled by attn_scale_dim, soft-capped, within the window in a local layer."""
    torch.manual_seed(0)
    config = tiny(**GEMMA)
    local = Attention(config, layer=0).eval()
    assert local.window == 4 and Attention(config, layer=1).window is None  # layer 2 (of 1, 2) is global
    x = torch.randn(2, 10, 32)
    q, k, v = local.qkv(x).split([4 * 12, 2 * 12, 2 * 12], dim=-1)
    q, k, v = (t.view(2, 10, -1, 12) for t in (q, k, v))
    q, k = local.q_norm(q).transpose(1, 2), local.k_norm(k).transpose(1, 2)  # no RoPE: rope=None
    k, v = k.repeat_interleave(2, dim=1), v.transpose(1, 2).repeat_interleave(2, dim=1)
    scores = 3.0 * torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(20) / 3.0)  # (2, 4, 10, 10)
    distance = torch.arange(10)[:, None] - torch.arange(10)  # query - key
    scores = scores.masked_fill((distance < 0) | (distance >= 4), float("-inf"))
    expected = local.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 48))
    window = gpt.window_mask(0, 10, end=10, window=4, device=torch.device("cpu"))
    torch.testing.assert_close(local(x, None, None, window=window), expected, rtol=1e-5, atol=1e-6)


def test_a_local_layer_never_sees_beyond_its_window_and_a_global_layer_does() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 50  # seen by positions 2..5 through a window of 4
    for global_every, reaches_the_end in [(0, False), (2, True)]:
        model = GPT(
            tiny(**(GEMMA | {"n_layer": 1 if global_every == 0 else 2, "global_every": global_every}))
        )
        a, _ = model.eval()(idx)
        b, _ = model(changed)
        assert not torch.allclose(a[:, 2:6], b[:, 2:6])
        assert torch.allclose(a[:, 6:], b[:, 6:]) != reaches_the_end


def test_rmsnorm1p_scales_by_one_plus_its_weight_in_fp32() -> None:
    norm = gpt.make_norm(tiny(norm="rmsnorm1p"), 32)
    assert torch.equal(norm.weight, torch.zeros(32))  # starts as the identity scale
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 32))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)) * (1 + norm.weight)
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x), expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_explicit_attention_of_one_query_per_row_equals_sdpa_with_per_row_masks(n_kv_head: int) -> None:
    """The compiled decode step's attention (`single_query_compiled`) against SDPA's: one query per row,
    each row seeing its own number of keys, grouped-query heads too."""
    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 8)  # (B, n_head, 1, head_dim)
    k, v = torch.randn(3, n_kv_head, 9, 8), torch.randn(3, n_kv_head, 9, 8)
    lengths = torch.tensor([2, 8, 5])  # row b's query is at position lengths[b]: it sees keys 0 .. lengths[b]
    mask = (torch.arange(9) <= lengths[:, None, None])[:, None]  # (B, 1, 1, S)
    for row, length in enumerate(lengths.tolist()):
        k[row, :, length + 1 :] = 1e4  # past each row's own keys: garbage that must stay unseen
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = gpt.explicit_attention(q, k, v, mask=mask, cap=None, scale=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not gpt.single_query_compiled(q)  # eager steps keep SDPA


def test_a_sliding_window_keeps_a_compiled_decode_steps_number_of_keys_dynamic() -> None:
    """`serve --compile`'s decode step (serve/engine.py) attends over a dynamic number of keys, 2 ..
    block_size: a window mask dropped while that number is within the window made dynamo specialize
    the graph to it, and compiling refused the range (ConstraintViolationError)."""
    torch.manual_seed(0)
    model = GPT(tiny(position="rope", sliding_window=3)).eval()
    cache = KVCache.allocate(model, 1, 17)
    lengths = torch.zeros(1, dtype=torch.long)

    def decode(tokens: torch.Tensor, lengths: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return model(tokens, cache=KVCache(cache.keys, cache.values, lengths, keys.size(0) - 1))[0][:, -1]

    compiled = torch.compile(decode, backend="eager", dynamic=False)  # dynamo's shapes; no kernels built
    idx = torch.randint(0, 50, (1, 9))
    span = torch.empty(17)
    with torch.inference_mode():
        model(idx[:, :1], cache=KVCache(cache.keys, cache.values))  # the prefill of one token
        lengths += 1
        steps = []
        for t in range(1, 9):  # within the window, then past it
            keys = span[: t + 1]
            torch._dynamo.mark_dynamic(keys, 0, min=2, max=16)
            steps.append(compiled(idx[:, t : t + 1], lengths, keys))
        full, _ = model(idx)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 1:], rtol=1e-4, atol=1e-5)
