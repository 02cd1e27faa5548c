"""The one loader of a checkpoint for use (`load`) and the session it gives every front end."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.config import Config, ModelConfig
from lmforge.data.chat_template import ChatTemplate
from lmforge.data.tokenizer import EOT, GENERATION_CONFIG, char_tokenizer, end_ids
from lmforge.errors import LmforgeError
from lmforge.inference import InferenceSession, ModelSource, load
from lmforge.inference.generate import generate
from lmforge.inference.sampling import SamplingOptions
from lmforge.model import GPT
from tests.conftest import random_char_run
from tests.inference.test_sampling import sentencepiece_tokenizer


def session_for(tokenizer: Tokenizer) -> InferenceSession:
    config = ModelConfig(n_layer=1, n_head=1, d_model=8, block_size=8, vocab_size=tokenizer.get_vocab_size())
    return InferenceSession(
        model=GPT(config).eval(),
        tokenizer=tokenizer,
        template=ChatTemplate.default(tokenizer),
        device=torch.device("cpu"),
        dtype="fp32",
        checkpoint=Path("unsaved"),
        step=0,
        config=Config(model=config),
        end_ids=end_ids(tokenizer),
    )


def test_without_a_prompt_a_sample_starts_at_endoftext_else_a_newline_else_token_0() -> None:
    with_eot = char_tokenizer("ab\n", specials=[EOT])
    assert session_for(with_eot).prompt_ids("") == [with_eot.token_to_id(EOT)]
    with_newline = char_tokenizer("ab\n")
    assert session_for(with_newline).prompt_ids("") == [with_newline.token_to_id("\n")]
    assert session_for(char_tokenizer("ab")).prompt_ids("") == [0]


def test_a_prompt_outside_the_tokenizer_is_refused() -> None:
    session = session_for(char_tokenizer("ab\n"))
    assert session.prompt_ids("ba") == session.tokenizer.encode("ba").ids
    with pytest.raises(LmforgeError, match="cannot represent"):
        session.prompt_ids("abc")
    # a lone surrogate (undecodable bytes in argv or stdin, "\\ud800" in JSON): no tokenizer takes it
    with pytest.raises(LmforgeError, match="cannot represent"):
        session.prompt_ids("a\udcff")


def test_a_session_holds_the_checkpoint_its_tokenizer_template_and_precision(tmp_path: Path) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    session = load(run, "last", "cpu", dtype="fp32")
    assert session.checkpoint == run / "checkpoints" / "step-0000001" and session.step == 1
    assert session.tokenizer.get_vocab_size() == session.config.model.vocab_size
    assert session.template.is_default and not session.model.training
    assert session.device == torch.device("cpu") and session.dtype == "fp32"
    assert ModelSource(run, "last", "cpu", "fp32").load().checkpoint == session.checkpoint
    assert session.source.load().step == 1  # what a child process loads: the same checkpoint


def test_a_native_run_ends_a_completion_at_endoftext_and_records_no_end_ids(tmp_path: Path) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    session = load(run, "last", "cpu", dtype="fp32")
    assert session.end_ids == (session.tokenizer.token_to_id(EOT),)
    assert not (session.checkpoint / GENERATION_CONFIG).exists()  # only an imported model's are written
    assert end_ids(char_tokenizer("ab")) == ()  # no <|endoftext|>: a completion runs to its length


@pytest.mark.parametrize("native", ["0", "1"])
def test_dtype_auto_is_bf16_where_the_device_computes_it_natively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: str
) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    monkeypatch.setenv("LMFORGE_NATIVE_BF16", native)
    assert load(run, "last", "cpu").dtype == ("bf16" if native == "1" else "fp32")
    assert load(run, "last", "cpu", dtype="fp32").dtype == "fp32"  # an explicit dtype stands


def test_a_session_without_weights_has_the_checkpoints_config_and_tokenizer_and_no_memory(
    tmp_path: Path,
) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    full = load(run, "last", "cpu", dtype="fp32")
    light = load(run, "last", "cpu", dtype="fp32", weights=False)
    assert light.model.config == full.model.config and light.checkpoint == full.checkpoint
    assert all(p.is_meta for p in light.model.parameters())
    assert light.prompt_ids("ab") == full.prompt_ids("ab")


def sentencepiece_session() -> tuple[InferenceSession, list[int], str]:
    """A session of Llama 2's tokenizer scheme whose greedy continuation of "The capital is" begins
    with a word, whose space SentencePiece's decoder strips at the start of a text; and that
    continuation's text as the whole text decodes it (the prompt's text cut off)."""
    tokenizer = sentencepiece_tokenizer()
    prompt = [2, 3, 4]  # The capital is
    for seed in range(50):
        torch.manual_seed(seed)
        session = session_for(tokenizer)
        ids = [int(t) for t in generate(session.model, torch.tensor([prompt]), 4, temperature=0)]
        if ids[0] in (2, 3, 4, 5):  # a word ("▁The" ... "▁Paris")
            whole = tokenizer.decode(prompt + ids)
            return session, prompt, whole[len(tokenizer.decode(prompt)) :]
    raise AssertionError("no seed gave a continuation that begins with a word")


def test_a_completion_keeps_the_space_before_its_first_word() -> None:
    session, prompt, expected = sentencepiece_session()
    options = SamplingOptions(max_new_tokens=4, temperature=0.0, top_k=None, top_p=None)
    assert expected.startswith(" ")
    assert "".join(session.complete(prompt, options, torch.Generator())) == expected


def test_fp16_off_cuda_is_refused_in_one_line_before_anything_runs(cli, tmp_path: Path) -> None:
    """fp16 autocast runs on CUDA only: `sample` printed the prompt and then failed naming train.dtype,
    `chat` answered every message with that error, and `serve`'s engine thread died with a traceback
    while the server went on refusing every request."""
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    with pytest.raises(LmforgeError, match="--dtype fp16 runs on CUDA only, not on cpu"):
        ModelSource(run, "last", "cpu", "fp16").load(weights=False)
    for verb in (["sample", run, "--prompt", "ab"], ["chat", run], ["serve", run, "--port", "0"]):
        code, out, err = cli(*verb, "--device", "cpu", "--dtype", "fp16")
        assert (code, out) == (1, "") and err.count("\n") == 1 and "--dtype fp16" in err, verb


def test_a_device_that_is_not_one_is_refused_in_one_line_naming_the_option(cli, tmp_path: Path) -> None:
    """`--device tpu` raised torch's RuntimeError with a traceback; an unavailable one named train.device."""
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    code, out, err = cli("sample", run, "--device", "tpu", "--prompt", "ab")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "--device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'" in err
    if not torch.cuda.is_available():
        code, out, err = cli("inspect", run, "--device", "cuda", "--prompt", "ab", "--out", tmp_path / "out")
        assert (code, out) == (1, "") and "--device is 'cuda' but CUDA is not available" in err
