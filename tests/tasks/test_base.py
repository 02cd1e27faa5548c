"""The helpers tasks share: scoring choices by their log-probabilities, decoding an answer."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import char_tokenizer
from lmforge.model import GPT
from lmforge.tasks.base import choice_log_probs, decode
from tests.tasks.conftest import TEXT


def test_choice_log_probs_are_the_sum_over_the_choice_tokens() -> None:
    tokenizer = char_tokenizer(TEXT)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=32, vocab_size=tokenizer.get_vocab_size())
    ).eval()
    prompt, choices = "Review: good\nSentiment:", [" no", " yes"]
    scores = choice_log_probs(model, tokenizer, prompt, choices=choices, device=torch.device("cpu"))
    for choice, score in zip(choices, scores):
        ids = tokenizer.encode(prompt + choice).ids
        logits, _ = model(torch.tensor([ids[:-1]]))
        expected = torch.log_softmax(logits[0], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][
            -len(choice) :
        ]
        assert score == pytest.approx(expected.sum().item(), rel=1e-5)


def test_a_decoded_answer_ends_at_one_of_the_models_end_ids() -> None:
    tokenizer = char_tokenizer(TEXT.replace("\n", ""))  # no newline and no <|endoftext|>: nothing ends it
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=32, vocab_size=tokenizer.get_vocab_size())
    ).eval()
    cpu = torch.device("cpu")
    free = decode(model, tokenizer, "Review: good", max_new_tokens=8, beam_size=1, device=cpu)
    assert len(free) == 8
    end = tokenizer.token_to_id(free[3])
    ended = decode(model, tokenizer, "Review: good", max_new_tokens=8, beam_size=1, device=cpu, end_ids=[end])
    assert ended == free[: free.index(free[3])]  # up to the first end token, which is left out
