"""Autoregressive generation with a KV cache: sampling filters, greedy decoding, beam search."""

import torch

from lmforge.config import ModelConfig
from lmforge.inference.generate import beam_search, generate, sample_next
from lmforge.model import GPT


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, block_size=16, vocab_size=50)
    return ModelConfig(**(base | overrides))


def test_generate_greedy_matches_argmax_of_full_forward() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = torch.randint(0, 50, (2, 4))
    produced = torch.stack(list(generate(model, prompt, max_new_tokens=30, temperature=0)), dim=1)
    assert produced.shape == (2, 30)  # continues past block_size (16)
    tokens = prompt
    for _ in range(12):  # up to block_size: a full recompute per token, as nanoGPT does
        logits, _ = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(produced[:, :12], tokens[:, 4:])


def test_a_bigram_model_generates_past_its_one_token_context() -> None:
    """block_size 1 (a bigram model): the context kept at a full cache is the newest token; keeping
    block_size // 2 = 0 tokens sliced `[-0:]`, all of them, and the second step raised a ValueError."""
    torch.manual_seed(0)
    model = GPT(tiny(block_size=1)).eval()
    produced = [int(t) for t in generate(model, torch.tensor([[7]]), max_new_tokens=5, temperature=0)]
    tokens = [7]
    for _ in range(5):  # each token from the one before it alone
        tokens.append(int(model(torch.tensor([tokens[-1:]]))[0][0, -1].argmax()))
    assert produced == tokens[1:]


def test_generate_ends_once_every_row_reaches_one_of_its_stop_tokens() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = torch.randint(0, 50, (1, 4))
    free = [int(t) for t in generate(model, prompt, max_new_tokens=12, temperature=0)]
    at = free.index(free[3])  # where the fourth token first appears
    unused = next(t for t in range(50) if t not in free)
    stopped = [int(t) for t in generate(model, prompt, 12, temperature=0, stop_tokens={unused, free[at]})]
    assert stopped == free[: at + 1] and len(stopped) < len(free)  # the stop token is yielded, no more


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 1, top_p=None, generator=g).item() for _ in range(20)} == {3}
    assert {sample_next(logits, 1.0, 2, top_p=None, generator=g).item() for _ in range(100)} == {2, 3}
    # top_p 0.5: p(3) = 0.64 already reaches it, so only token 3 remains.
    assert {sample_next(logits, 1.0, None, top_p=0.5, generator=g).item() for _ in range(20)} == {3}
    assert {sample_next(logits, 1.0, None, top_p=0.85, generator=g).item() for _ in range(200)} == {
        2,
        3,
    }  # 0.64 + 0.24
    assert sample_next(logits, 0.0, None, top_p=None, generator=g).item() == 3


def test_beam_search_of_width_one_is_greedy_and_wider_beams_score_higher() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = torch.randint(0, 50, (1, 4))
    greedy = [int(t) for t in generate(model, prompt, 8, temperature=0)]
    assert beam_search(model, prompt, beam_size=1, max_new_tokens=8, stop_tokens=set()) == greedy

    def log_prob(tokens: list[int]) -> float:
        full = torch.cat([prompt, torch.tensor([tokens])], dim=1)
        logits, _ = model(full[:, :-1])
        return torch.log_softmax(logits[0, 3:], -1).gather(1, full[0, 4:, None]).sum().item()

    wide = beam_search(model, prompt, beam_size=4, max_new_tokens=8, stop_tokens=set(), length_penalty=0.0)
    assert len(wide) == 8 and log_prob(wide) >= log_prob(greedy) - 1e-4
    assert (
        beam_search(model, prompt, beam_size=1, max_new_tokens=8, stop_tokens={greedy[0]}) == []
    )  # stops at once
    unused = next(t for t in range(50) if t not in greedy)
    assert beam_search(model, prompt, beam_size=1, max_new_tokens=8, stop_tokens={unused}) == greedy


LIKELIEST = [2, 1]  # the argmax of each row of SKEWED
SKEWED = torch.tensor([[0.0, 1.0, 3.0, 2.0], [-5.0, 4.0, 1.0, 0.0]])


def test_a_tiny_temperature_picks_the_likeliest_token_not_nan() -> None:
    """logits / 1e-40 overflowed to inf (inf - inf: NaN probabilities), and a temperature below
    float32's smallest number divided by 0: multinomial refused both."""
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-40, 1e-300, 5e-324):
        assert sample_next(SKEWED, temperature, None, top_p=None, generator=g).view(-1).tolist() == LIKELIEST


def test_a_tiny_top_p_keeps_the_likeliest_token() -> None:
    """A top_p that float32 rounds to 0 dropped every token, and multinomial refused the NaNs."""
    g = torch.Generator().manual_seed(0)
    for top_p in (1e-300, 1e-46):
        assert sample_next(SKEWED, 2.0, None, top_p=top_p, generator=g).view(-1).tolist() == LIKELIEST
