"""Tokenizers, all expressed as Hugging Face `tokenizers.Tokenizer` objects.

Keeping every kind (char, byte, BPE, user file) in the one HF representation means one
`tokenizer.json` format for runs, checkpoints and exports, and that `transformers` can load
what lmforge saves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import LmforgeError

EOT = "<|endoftext|>"
BUILTIN_KINDS = ("char", "byte", "bpe")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, which the ByteLevel pre-tokenizer uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def char_tokenizer(chars: Iterable[str], specials: Iterable[str] = ()) -> Tokenizer:
    """One id per character, in sorted order (nanoGPT's char vocabulary), then the specials."""
    alphabet = sorted(set(chars))
    # A BPE with no merges maps each character to its id; without a pre-tokenizer it is
    # several times faster than a per-character split.
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(specials))
    return tokenizer


def byte_tokenizer() -> Tokenizer:
    """Exactly 256 ids: the id of each token is the value of its UTF-8 byte."""
    vocab = {symbol: byte for byte, symbol in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    _make_byte_level(tokenizer)
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE with `<|endoftext|>` as its special token."""
    check_bpe_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    _make_byte_level(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE vocabulary too small for the 256 bytes and `<|endoftext|>`."""
    minimum = 256 + 1
    if vocab_size < minimum:
        raise LmforgeError(
            f"--vocab-size must be at least {minimum} for bpe (256 bytes + {EOT}), got {vocab_size}"
        )


def _make_byte_level(tokenizer: Tokenizer) -> None:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a `tokenizer.json`, with a one-line error when it is missing or does not parse."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LmforgeError(f"{path}: not a valid tokenizer.json ({reason})") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) == 0:  # no id to give any text
        raise LmforgeError(f"{path}: the tokenizer has an empty vocabulary")
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int | None:
    """The id of `<|endoftext|>`, or None when the tokenizer has no such token."""
    return tokenizer.token_to_id(EOT)


def vocab_size(tokenizer: Tokenizer) -> int:
    """One more than the largest id, so that every id indexes an embedding row."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    if not ids:
        raise LmforgeError("the tokenizer has an empty vocabulary")
    return max(ids) + 1


def check_same_tokenizer(
    data_dir: Path, data_tokenizer: Path, checkpoint_tokenizer: Path, source: str
) -> None:
    """Refuse data encoded with another tokenizer than the model's (`source` names the model's origin).

    Byte equality of the two tokenizer.json files: the rule every command uses, strict enough
    that token ids always mean the same text.
    """
    if Path(data_tokenizer).read_bytes() != Path(checkpoint_tokenizer).read_bytes():
        raise LmforgeError(f"{data_dir}: its tokenizer differs from the one of {source}")
