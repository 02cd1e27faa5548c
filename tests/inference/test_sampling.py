"""The rules of generation that every front end shares: the sampling options, and text as it decodes."""

import random
import sys
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from lmforge.data.tokenizer import byte_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference import sampling
from lmforge.inference.sampling import SamplingOptions, StopScanner, TextDecoder


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


# --- stop strings ------------------------------------------------------------------------------------


def scan(pieces: list[str], stops: tuple[str, ...], *, reply: bool = False) -> list[str]:
    """What a StopScanner releases after each piece (and at the end, if no stop came)."""
    scanner, out = StopScanner(stops, reply=reply), []
    for piece in pieces:
        out.append(scanner.feed(piece))
        if scanner.stopped:
            return out
    return [*out, scanner.finish()]


def scan_by_rescanning(pieces: list[str], stops: tuple[str, ...], *, reply: bool = False) -> list[str]:
    """The specification, by brute force: after each piece, all the text so far is searched for the
    first stop; what is released is the text before it, or else all but the longest end of the text
    that begins a stop (it may yet become one), less what was released before."""
    stops, text, out, done = tuple(s for s in stops if s), "", [], 0
    for piece in pieces:
        text = (text + piece).lstrip() if reply else text + piece
        found = [at for stop in stops if (at := text.find(stop)) >= 0]
        if found:
            return [*out, text[done : min(found)]]
        held = max((n for stop in stops for n in range(len(stop)) if text.endswith(stop[:n])), default=0)
        out.append(text[done : len(text) - held])
        done = len(text) - held
    return [*out, text[done:]]


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["ab", "c<|e", "nd|>x"], ("<|end|>",), ["ab", "c", ""]),  # across three pieces
        (["xaab", "ab"], ("aabab",), ["x", ""]),  # a false start that overlaps the real one
        (["aaaa", "ab"], ("aaab",), ["a", "a"]),
        (["Grüße", " 日本", "語。"], ("日本語",), ["Grüße", " ", ""]),  # unicode, across pieces
        (["ab", "cd"], ("bcd", "c"), ["a", ""]),  # the stop that starts first ends the text
        (["ab", "cd"], ("c", "bcd"), ["a", ""]),
        (["ab", "cz"], ("bcd",), ["a", "bcz", ""]),  # a stop that never completes is released at the end
        (["  \n", "a\nb"], ("\n",), ["", "a"]),  # reply: the blank before it does not count
    ],
)
def test_stop_strings_end_the_text_before_them_across_pieces(
    pieces: list[str], stops: tuple[str, ...], expected: list[str]
) -> None:
    reply = pieces[0].isspace()
    assert scan(pieces, stops, reply=reply) == expected == scan_by_rescanning(pieces, stops, reply=reply)


def test_stop_strings_match_the_brute_force_search_on_random_text() -> None:
    """Random pieces and stops over a small alphabet (many overlaps, unicode among them)."""
    rng = random.Random(0)
    alphabet = "ab ñ日\n"
    for case in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(6, len(text) + 1))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stops = tuple("".join(rng.choice(alphabet[:4]) for _ in range(rng.randint(0, 6))) for _ in range(3))
        reply = case % 2 == 1
        assert scan(pieces, stops, reply=reply) == scan_by_rescanning(pieces, stops, reply=reply), (
            pieces,
            stops,
        )


def lines_run(action: Callable[[], object]) -> int:
    """Lines of lmforge.inference.sampling that `action` runs: the work done, counted, not timed."""
    count, module_file = 0, sampling.__file__

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != module_file:
            return None
        count += event == "line"
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(previous)
    return count


def test_a_long_stop_string_costs_each_token_the_same_however_long_the_text_that_begins_it() -> None:
    """The worst case: every character could be the start of the stop. Twice the text and twice the
    stop must take about twice the work, not four times."""

    def work(n: int) -> int:
        stop = "a" * (n - 1) + "b"
        return lines_run(lambda: scan(["a"] * n, (stop, "\n")))

    small, large = work(400), work(800)
    assert large < 2.5 * small, (small, large)
