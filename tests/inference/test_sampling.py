"""The rules of `lmforge sample` that every front end shares: options, and where a sample starts."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference.sampling import Sampler, SamplingOptions
from lmforge.model import GPT
from tests.conftest import random_char_run


def sampler_for(tokenizer: Tokenizer) -> Sampler:
    config = ModelConfig(n_layer=1, n_head=1, d_model=8, block_size=8, vocab_size=tokenizer.get_vocab_size())
    return Sampler(GPT(config).eval(), tokenizer, torch.device("cpu"), "fp32")


def test_without_a_prompt_a_sample_starts_at_endoftext_else_a_newline_else_token_0() -> None:
    with_eot = char_tokenizer("ab\n", specials=[EOT])
    assert sampler_for(with_eot).prompt_ids("") == [with_eot.token_to_id(EOT)]
    with_newline = char_tokenizer("ab\n")
    assert sampler_for(with_newline).prompt_ids("") == [with_newline.token_to_id("\n")]
    assert sampler_for(char_tokenizer("ab")).prompt_ids("") == [0]


def test_a_prompt_outside_the_tokenizer_is_refused() -> None:
    sampler = sampler_for(char_tokenizer("ab\n"))
    assert sampler.prompt_ids("ba") == sampler.tokenizer.encode("ba").ids
    with pytest.raises(LmforgeError, match="cannot represent"):
        sampler.prompt_ids("abc")


@pytest.mark.parametrize(
    "temperature, top_p, message",
    [(-0.1, None, "--temperature must be >= 0"), (1.0, 0.0, "--top-p must be in"), (1.0, 1.5, "--top-p")],
)
def test_sampling_options_out_of_range_are_refused(
    temperature: float, top_p: float | None, message: str
) -> None:
    with pytest.raises(LmforgeError, match=message):
        SamplingOptions(max_new_tokens=5, temperature=temperature, top_k=None, top_p=top_p)
    SamplingOptions(
        max_new_tokens=5, temperature=0.0, top_k=None, top_p=1.0
    )  # the bounds themselves are valid


def test_threads_sets_the_cpu_threads_the_model_runs_on(cli, tmp_path: Path) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, out, _ = cli("sample", run, "--threads", "1", "--max-new-tokens", "3", "--prompt", "ab")
        assert code == 0 and out and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_sampler_without_weights_has_the_checkpoints_config_and_tokenizer_and_no_memory(
    tmp_path: Path,
) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    full = Sampler.load(run, "last", "cpu", "fp32")
    light = Sampler.load(run, "last", "cpu", "fp32", weights=False)
    assert light.model.config == full.model.config and light.checkpoint == full.checkpoint
    assert all(p.is_meta for p in light.model.parameters())
    assert light.prompt_ids("ab") == full.prompt_ids("ab")
