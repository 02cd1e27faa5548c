from pathlib import Path

import pytest
from tokenizers import AddedToken, normalizers, pre_tokenizers

from lmforge.data import tokenizer as tok
from lmforge.errors import LmforgeError

SAMPLE = "héllo wörld\n\n  日本語 🙂\ttabs\r\nend "


def test_char_tokenizer_uses_sorted_alphabet_and_round_trips() -> None:
    tokenizer = tok.char_tokenizer("banana\n")
    assert tokenizer.get_vocab() == {"\n": 0, "a": 1, "b": 2, "n": 3}
    assert tokenizer.encode("nab\n").ids == [3, 1, 2, 0]
    assert tokenizer.decode(tokenizer.encode("banana\n\nban").ids) == "banana\n\nban"


def test_char_tokenizer_specials_come_after_the_alphabet() -> None:
    tokenizer = tok.char_tokenizer("ab", specials=[tok.EOT])
    assert tok.eot_id(tokenizer) == 2
    assert tok.vocab_size(tokenizer) == 3


def test_byte_tokenizer_ids_are_utf8_bytes() -> None:
    tokenizer = tok.byte_tokenizer()
    assert tok.vocab_size(tokenizer) == 256
    ids = tokenizer.encode(SAMPLE).ids
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tokenizer.decode(ids) == SAMPLE
    assert tok.eot_id(tokenizer) is None


def test_bpe_trains_to_vocab_size_and_round_trips() -> None:
    text = ("the quick brown fox jumps over the lazy dog. " * 50 + SAMPLE) * 4
    tokenizer = tok.train_bpe([text], vocab_size=300)
    assert tok.vocab_size(tokenizer) == 300
    assert tok.eot_id(tokenizer) == 0
    ids = tokenizer.encode(text).ids
    assert len(ids) < len(text.encode("utf-8"))  # merges compress
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("vocab_size", [0, 256])
def test_bpe_vocab_too_small_is_an_error(vocab_size: int) -> None:
    with pytest.raises(LmforgeError, match="at least 257"):
        tok.train_bpe(["abc"], vocab_size=vocab_size)


@pytest.mark.parametrize("build", [lambda: tok.char_tokenizer(SAMPLE, [tok.EOT]), tok.byte_tokenizer])
def test_saved_tokenizer_reloads_exactly(tmp_path: Path, build) -> None:
    tokenizer = build()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    reloaded = tok.load_tokenizer(tmp_path / "tokenizer.json")
    assert reloaded.get_vocab(with_added_tokens=True) == tokenizer.get_vocab(with_added_tokens=True)
    assert reloaded.encode(SAMPLE).ids == tokenizer.encode(SAMPLE).ids
    assert reloaded.decode(reloaded.encode(SAMPLE).ids) == SAMPLE


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="not found"):
        tok.load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": 42}')
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json"):
        tok.load_tokenizer(bad)


def test_a_tokenizer_with_ids_beyond_any_model_vocabulary_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 2**24}, unk_token="a")).save(str(tmp_path / "sparse.json"))
    with pytest.raises(LmforgeError, match="ids up to 16,777,216, more than a model's vocabulary may hold"):
        tok.load_tokenizer(tmp_path / "sparse.json")


def test_byte_level_bpes_represent_all_text_and_others_are_checked() -> None:
    bpe = tok.train_bpe([SAMPLE * 3], 300)
    assert tok.represents_all_text(bpe) and tok.represents_all_text(tok.byte_tokenizer())
    assert bpe.decode(bpe.encode(SAMPLE + tok.EOT).ids, skip_special_tokens=False) == SAMPLE + tok.EOT
    assert not tok.represents_all_text(tok.char_tokenizer(SAMPLE))  # lacks every other character
    lowered = tok.train_bpe([SAMPLE], 300)
    lowered.normalizer = normalizers.Lowercase()  # rewrites text: "H" comes back "h"
    assert not tok.represents_all_text(lowered)
    stripping = tok.train_bpe([SAMPLE], 300)
    stripping.add_tokens([AddedToken("<sep>", rstrip=True)])  # eats the spaces after it
    assert not tok.represents_all_text(stripping)
    prefixed = tok.train_bpe([SAMPLE], 300)
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not tok.represents_all_text(prefixed)
