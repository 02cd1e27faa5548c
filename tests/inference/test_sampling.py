"""The rules of generation that every front end shares: the sampling options, and text as it decodes."""

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from lmforge.data.tokenizer import byte_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference.sampling import SamplingOptions, TextDecoder


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


def sentencepiece_tokenizer() -> Tokenizer:
    """Llama 2's scheme (Mistral-7B-v0.3, Phi-3): a word's token carries its space as "▁", and the
    decoder strips the space that the normalizer put before the first word of a text."""
    vocab = {"<unk>": 0, "<s>": 1, "▁The": 2, "▁capital": 3, "▁is": 4, "▁Paris": 5, ".": 6}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<s>"])
    return tokenizer


def decoded(decoder: TextDecoder, ids: list[int]) -> str:
    return "".join(decoder.feed(i) for i in ids) + decoder.finish()


def test_a_continuation_keeps_the_space_before_its_first_word() -> None:
    """With the prompt as context, "▁Paris" after "The capital is" is " Paris", as in the whole text:
    decoded alone it was the start of a text, its space stripped ("The capital isParis")."""
    tokenizer = sentencepiece_tokenizer()
    prompt = [2, 3, 4]  # The capital is
    assert decoded(TextDecoder(tokenizer, end_ids=(), context=prompt), [5, 6]) == " Paris."
    assert tokenizer.decode([*prompt, 5, 6]) == "The capital is Paris."
    # after a special token (the start of a document), the first word has no space before it
    assert decoded(TextDecoder(tokenizer, end_ids=(), context=[1]), [5, 6]) == "Paris."


def test_any_of_the_end_ids_ends_the_text_and_none_of_it_is_shown() -> None:
    tokenizer = sentencepiece_tokenizer()
    for end in (1, 6):
        decoder = TextDecoder(tokenizer, end_ids=(1, 6), context=[2, 3, 4])
        assert (decoder.feed(5), decoder.done, decoder.feed(end), decoder.done) == (" Paris", False, "", True)
    assert decoded(TextDecoder(tokenizer, end_ids=(), context=[2, 3, 4]), [5, 6]) == " Paris."


def test_the_prompts_bytes_never_reach_the_continuation() -> None:
    """A byte-level prompt whose last tokens start inside a character, or never make one, adds
    nothing to the continuation's text."""
    tokenizer = byte_tokenizer()
    ids = list("日本 a".encode())
    assert decoded(TextDecoder(tokenizer, end_ids=(), context=ids[1:6]), ids[6:]) == " a"
    assert decoded(TextDecoder(tokenizer, end_ids=(), context=[0x97, 0x97]), list(b"ab")) == "ab"
