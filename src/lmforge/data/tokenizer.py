"""Tokenizers, all expressed as Hugging Face `tokenizers.Tokenizer` objects.

Keeping every kind (char, byte, BPE, user file) in the one HF representation means one
`tokenizer.json` format for runs, checkpoints and exports, and that `transformers` can load
what lmforge saves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config import MAX_VOCAB_SIZE
from lmforge.errors import LmforgeError
from lmforge.jsonl import read_json_object

EOT = "<|endoftext|>"
# A checkpoint's own end-of-text ids, as Hugging Face's generation_config.json spells them (`eos_token_id`,
# an int or a list), written by `import`; a checkpoint without one ends completions at <|endoftext|>
GENERATION_CONFIG = "generation_config.json"
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
    if vocab_size(tokenizer) > MAX_VOCAB_SIZE:  # refused now rather than by the config of every run
        raise LmforgeError(
            f"{path}: ids up to {vocab_size(tokenizer) - 1:,}, more than a model's vocabulary may hold "
            f"({MAX_VOCAB_SIZE:,})"
        )
    return tokenizer


def tokenizable(text: str) -> bool:
    """Whether a tokenizer takes `text` at all: it refuses (TypeError) a str with a lone surrogate,
    which undecodable bytes in argv or stdin become (surrogate escapes), as does "\\ud800" in JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def eot_id(tokenizer: Tokenizer) -> int | None:
    """The id of `<|endoftext|>`, or None when the tokenizer has no such token."""
    return tokenizer.token_to_id(EOT)


def end_ids(tokenizer: Tokenizer, recorded: Sequence[int] = ()) -> tuple[int, ...]:
    """The ids that end a completion: those `recorded` with a checkpoint (`read_end_ids`), else
    <|endoftext|>, else none (a completion then runs to its length)."""
    if recorded:
        return tuple(recorded)
    eot = eot_id(tokenizer)
    return () if eot is None else (eot,)


def read_end_ids(folder: Path) -> tuple[int, ...]:
    """The end ids recorded in `folder`'s generation_config.json; () when it has none (a native run)."""
    path = folder / GENERATION_CONFIG
    return parse_end_ids(read_json_object(path).get("eos_token_id"), path)


def parse_end_ids(named: object, origin: Path) -> tuple[int, ...]:
    """An `eos_token_id` as Hugging Face writes it (a token id, a list of them, or null) as ids;
    a one-line error naming `origin` for anything else."""
    if named is None:
        return ()
    ids = [named] if isinstance(named, int) else named
    if (
        isinstance(named, bool)
        or not isinstance(ids, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        raise LmforgeError(f"{origin}: eos_token_id must be a token id or a list of them; got {named!r}")
    return tuple(ids)


def write_end_ids(folder: Path, ids: Sequence[int]) -> None:
    """generation_config.json in `folder` with `ids` as its eos_token_id (read back by `read_end_ids`)."""
    content = {"eos_token_id": list(ids)}
    (folder / GENERATION_CONFIG).write_text(json.dumps(content, indent=2) + "\n")


def vocab_size(tokenizer: Tokenizer) -> int:
    """One more than the largest id, so that every id indexes an embedding row."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    if not ids:
        raise LmforgeError("the tokenizer has an empty vocabulary")
    return max(ids) + 1


def check_same_tokenizer(
    data_dir: Path, data_tokenizer: Path, checkpoint_tokenizer: Path, *, source: str
) -> None:
    """Refuse data encoded with another tokenizer than the model's (`source` names the model's origin).

    Byte equality of the two tokenizer.json files: the rule every command uses, strict enough
    that token ids always mean the same text.
    """
    if Path(data_tokenizer).read_bytes() != Path(checkpoint_tokenizer).read_bytes():
        raise LmforgeError(f"{data_dir}: its tokenizer differs from the one of {source}")


UNKNOWN_CHARS = ("error", "replace", "skip")  # `prepare --unknown-chars`


def unk_token(tokenizer: Tokenizer) -> str | None:
    """The model's unknown token (what it emits for text outside its vocabulary), if it has one."""
    model = json.loads(tokenizer.to_str()).get("model") or {}
    token = model.get("unk_token")
    if token is None and isinstance(model.get("unk_id"), int) and isinstance(model.get("vocab"), list):
        entry = model["vocab"][model["unk_id"]] if model["unk_id"] < len(model["vocab"]) else None
        token = entry[0] if isinstance(entry, list) and entry else None  # Unigram: [piece, score] pairs
    return token if isinstance(token, str) and tokenizer.token_to_id(token) is not None else None


def represents_all_text(tokenizer: Tokenizer) -> bool:
    """Whether decode(encode(text)) == text holds for every text by the tokenizer's construction, so
    that checking it text by text is wasted work: a byte-level BPE (GPT-2's kind, and `bpe`'s and
    `byte`'s here) with nothing that adds, drops or rewrites text. Conservative: False when unsure.

    Needs no normalizer, truncation or padding; a ByteLevel pre-tokenizer without a prefix space and
    a ByteLevel decoder; a BPE holding every one of the 256 byte symbols, without word affixes; and
    added tokens that strip nothing and are printable ASCII, which the byte decoder gives back as is.
    """
    spec = json.loads(tokenizer.to_str())
    pre, decoder, model = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}, spec.get("model") or {}
    if spec.get("normalizer") or spec.get("truncation") or spec.get("padding"):
        return False
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or decoder.get("type") != "ByteLevel":
        return False
    affixes = model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    if model.get("type") != "BPE" or affixes:
        return False
    if not set(_bytes_to_unicode().values()) <= set(model.get("vocab") or {}):
        return False
    return all(
        not token.get("lstrip") and not token.get("rstrip") and all("!" <= c <= "~" for c in token["content"])
        for token in spec.get("added_tokens") or []
    )


class TextCoverage:
    """Which characters a tokenizer represents, and how to encode text that has others.

    Text is representable when decode(encode(text)) == text, the rule every command uses. A character
    is tested alone, once (the result is cached), so text that fails the rule is split around the
    characters that fail it alone: `policy` "replace" puts the unknown token in their place, "skip"
    drops them. Text that still does not survive is not a matter of unknown characters: an error.
    """

    def __init__(self, tokenizer: Tokenizer, policy: str, name: str) -> None:
        self.tokenizer, self.policy, self.name = tokenizer, policy, name
        self.unk = unk_token(tokenizer)
        self.all_text = represents_all_text(tokenizer)  # then no text needs checking
        if policy == "replace" and self.unk is None:
            raise LmforgeError(f"{name} has no unknown token; use --unknown-chars skip to drop what it lacks")
        self._known: dict[str, bool] = {}
        self.count = 0  # characters replaced or skipped so far
        self.first = ""  # the first of them, and where it was

    def survives(self, char: str) -> bool:
        """Whether one character comes back from encode and decode."""
        if char not in self._known:
            ids = self.tokenizer.encode(char, add_special_tokens=False).ids
            self._known[char] = self.tokenizer.decode(ids, skip_special_tokens=False) == char
        return self._known[char]

    def unknown(self, text: str) -> set[str]:
        return {c for c in set(text) if not self.survives(c)}

    def encode(self, text: str, where: Callable[[int], tuple[str, str]]) -> list[int]:
        """Ids of text that failed decode(encode(text)) == text, under the policy. `where(i)` names
        character i of `text` for messages: (file, "at character N")."""
        unknown = self.unknown(text)
        if not unknown or self.policy == "error":
            raise self._error(text, unknown, where)
        first = min(text.index(c) for c in unknown)
        segments = re.split("[" + "".join(re.escape(c) for c in sorted(unknown)) + "]", text)
        if not self.first:
            self.first = "{} in {} {}".format(_describe(text[first]), *where(first))
        self.count += len(segments) - 1
        if self.policy == "skip":
            segments = ["".join(segments)]
        encodings = self.tokenizer.encode_batch(segments, add_special_tokens=False)
        decoded = self.tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        if decoded != segments:  # the rest does not survive either: not a matter of unknown characters
            raise self._error(text, set(), where)
        unk = self.tokenizer.token_to_id(self.unk) if self.unk is not None else None
        ids = encodings[0].ids
        for encoding in encodings[1:]:  # replace: one unknown token between consecutive segments
            ids += [unk, *encoding.ids]
        return ids

    def _error(self, text: str, unknown: set[str], where: Callable[[int], tuple[str, str]]) -> LmforgeError:
        if unknown:
            first = min(text.index(c) for c in unknown)
            file, at = where(first)
            return LmforgeError(
                f"{file}: character {_describe(text[first])} {at} cannot be represented by {self.name} "
                "(--unknown-chars replace or skip to go on without it)"
            )
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        decoded = self.tokenizer.decode(ids, skip_special_tokens=False)
        at = next((i for i, (a, b) in enumerate(zip(text, decoded)) if a != b), min(len(text), len(decoded)))
        file, position = where(at)
        return LmforgeError(
            f"{file}: {self.name} does not reproduce the text {position} ({text[at : at + 20]!r} came back "
            f"as {decoded[at : at + 20]!r}); a tokenizer must decode its ids to the text they encode"
        )

    def report(self) -> str | None:
        """The warning that counts what was replaced or skipped, if anything was."""
        if not self.count:
            return None
        what = f"{self.count:,} character{'s' if self.count > 1 else ''} the tokenizer cannot represent"
        action = f"replaced {what} with {self.unk!r}" if self.policy == "replace" else f"skipped {what}"
        return f"{action} (first: {self.first})"


def _describe(char: str) -> str:
    return f"{char!r} (U+{ord(char):04X})"
