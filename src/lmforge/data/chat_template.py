"""Chat templates: how a conversation becomes the text a model reads, the Hugging Face way.

A template is Jinja, rendered as `transformers`' `apply_chat_template` renders it (a sandboxed,
immutable environment with `trim_blocks` and `lstrip_blocks`, `raise_exception`, `strftime_now`
and a `tojson` that keeps non-ASCII), given `messages`, `add_generation_prompt` and the special
tokens (`bos_token`, `eos_token`). Fine-tuning on `messages` data and `lmforge chat` both go
through `ChatTemplate.segments`, so a model is talked to in exactly the format it was trained on,
down to where the text is cut into tokens.

Where a template lives: `tokenizer_config.json` beside `tokenizer.json` in a checkpoint (keys
`chat_template`, `bos_token`, `eos_token`, as in a Hugging Face folder). `import` also reads
transformers' newer `chat_template.jinja`; a checkpoint without one gets DEFAULT_CHAT_TEMPLATE.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer

from lmforge.data.tokenizer import EOT, tokenizable
from lmforge.errors import LmforgeError
from lmforge.jsonl import read_json_object

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.52 saves a single template
SPECIAL_TOKENS = ("bos_token", "eos_token")

# lmforge's default: one `role: content` line per message, the assistant's ended by <|endoftext|>
# when the tokenizer has it; the generation prompt is `assistant:`. It needs no special token but
# <|endoftext|> and only plain characters, so even the char-level Shakespeare model can be talked to.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
_SENTINEL = "\x00lmforge-reply\x00"  # stands for a reply when the template's end of turn is found


class Segment(NamedTuple):
    """A piece of a rendered conversation: the text, and whether it is the assistant's (trained on)."""

    text: str
    assistant: bool


@cache
def _compile(source: str) -> Any:
    """The template compiled in an environment like transformers' (templates from the Hub are untrusted)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    # transformers' tojson filter, whose arguments a template may pass positionally: its signature stays
    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise LmforgeError(f"chat template: {exc.message} (line {exc.lineno})") from None


def check_messages(messages: object) -> list[dict[str, str]]:
    """`messages` as a list of {role, content} string pairs, else a ValueError saying what is wrong."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError("'messages' must be a list of {role, content} strings")
    return messages


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special tokens it may name."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token when known

    @classmethod
    def default(cls, tokenizer: Tokenizer, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """DEFAULT_CHAT_TEMPLATE with the model's special tokens (`_model_specials`)."""
        return cls(DEFAULT_CHAT_TEMPLATE, _model_specials(tokenizer, special_tokens))

    @classmethod
    def from_file(
        cls, path: Path, tokenizer: Tokenizer, special_tokens: dict[str, str] | None = None
    ) -> ChatTemplate:
        """A `.jinja` file (`data.chat_template`), checked to compile, with the model's special
        tokens (`_model_specials`)."""
        try:
            source = _read_template(path)
        except (OSError, ValueError) as exc:
            raise LmforgeError(f"data.chat_template: cannot read {path} ({exc})") from None
        _compile(source)
        return cls(source, _model_specials(tokenizer, special_tokens))

    @classmethod
    def find(cls, folder: Path) -> ChatTemplate | None:
        """The template of a checkpoint or Hugging Face folder: `chat_template.jinja`, else the
        `chat_template` of `tokenizer_config.json` (a string, or a list of named ones: `default`)."""
        config = read_json_object(folder / TOKENIZER_CONFIG)
        specials = _special_tokens(config)
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            try:
                source = _read_template(folder / CHAT_TEMPLATE_FILE)
            except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                raise LmforgeError(f"{folder / CHAT_TEMPLATE_FILE}: unreadable ({exc})") from None
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str):
            return None
        try:
            _compile(source)
        except LmforgeError as exc:
            raise LmforgeError(f"{folder}: {exc}") from None
        return cls(source, specials)

    @classmethod
    def of_checkpoint(cls, folder: Path, tokenizer: Tokenizer) -> ChatTemplate:
        """The template saved with a checkpoint, else the default one."""
        return cls.find(folder) or cls.default(tokenizer)

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_CHAT_TEMPLATE

    def save(self, folder: Path) -> None:
        """`tokenizer_config.json` in `folder`: the template and its special tokens."""
        content = {"chat_template": self.source, **self.special_tokens}
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as transformers' `apply_chat_template(..., tokenize=False)`."""
        import jinja2

        compiled = _compile(self.source)
        try:
            return compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) included
            raise LmforgeError(f"chat template: {exc}") from None
        except Exception as exc:  # the template's own Python errors (a str + an int, a division by 0)
            raise LmforgeError(f"chat template: {type(exc).__name__}: {exc}") from None

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation cut at each assistant reply: a reply's segment runs from the
        end of the generation prompt before it to the end of its turn (end-of-turn text included)."""
        full = self.render(messages, add_generation_prompt)
        pieces, position = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[: i + 1])
            if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
                raise LmforgeError(
                    "chat template: earlier turns render differently once later ones follow, so the "
                    "assistant's replies cannot be located in the text"
                )
            pieces += [
                Segment(full[position : len(start)], False),
                Segment(full[len(start) : len(end)], True),
            ]
            position = len(end)
        pieces.append(Segment(full[position:], False))
        return [s for s in pieces if s.text]

    def end_of_turn(self) -> str:
        """The text the template puts after a reply, stripped (`<|endoftext|>`, `<|im_end|>`), or
        the whitespace itself when that is all there is (`\\n`): where a reply being generated ends."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        rendered = self.render(messages)
        after = rendered[rendered.rfind(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in rendered else ""
        return after.strip() or after


class Encoded(NamedTuple):
    ids: list[int]
    assistant: list[bool]  # per token: part of an assistant reply
    exact: bool  # the ids decode back to the text (else the tokenizer cannot represent it)


def encode_segments(tokenizer: Tokenizer, conversations: list[list[Segment]]) -> list[Encoded]:
    """Each conversation's segments tokenized one by one and joined (all in one batch); the segments
    after a conversation's first continue its text (`continuation`)."""
    # text no tokenizer takes is encoded as nothing: its conversation is then not exact
    texts = [[s.text if tokenizable(s.text) else "" for s in segments] for segments in conversations]
    firsts = iter(tokenizer.encode_batch([t[0] for t in texts if t], add_special_tokens=False))
    rests = iter(
        continuation(tokenizer).encode_batch([x for t in texts for x in t[1:]], add_special_tokens=False)
    )
    encodings = [next(firsts if i == 0 else rests) for t in texts for i in range(len(t))]  # in segment order
    out, k = [], 0
    for segments in conversations:
        ids: list[int] = []
        assistant: list[bool] = []
        for segment, encoding in zip(segments, encodings[k : k + len(segments)]):
            ids += encoding.ids
            assistant += [segment.assistant] * len(encoding.ids)
        k += len(segments)
        text = "".join(s.text for s in segments)
        out.append(Encoded(ids, assistant, tokenizer.decode(ids, skip_special_tokens=False) == text))
    return out


def _read_template(path: Path) -> str:
    """A template file's text; a UTF-8 byte order mark (Notepad's) is no part of it, or it would be
    rendered at the start of every conversation."""
    return path.read_text(encoding="utf-8").removeprefix("\ufeff")


# made once per tokenizer object (its JSON is megabytes: not parsed per chat turn or request)
_CONTINUATIONS: weakref.WeakKeyDictionary[Tokenizer, Tokenizer | None] = weakref.WeakKeyDictionary()


def continuation(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` for text that continues a text: without SentencePiece's dummy prefix, the "▁" that
    Llama 2-style tokenizers (Mistral, Phi-3: a Prepend normalizer; newer files: a Metaspace
    pre-tokenizer) put before the start of every text they encode. `tokenizer` itself where it has none."""
    if tokenizer not in _CONTINUATIONS:
        parsed = json.loads(tokenizer.to_str())
        changed = [_drop_prefix(parsed.get(part)) for part in ("normalizer", "pre_tokenizer")]
        _CONTINUATIONS[tokenizer] = Tokenizer.from_str(json.dumps(parsed)) if any(changed) else None
    return _CONTINUATIONS[tokenizer] or tokenizer


def _drop_prefix(component: dict | None) -> bool:
    """Turn off the dummy prefix of a normalizer or pre-tokenizer (JSON), in place; whether it had one."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == "Metaspace" and component.get("prepend_scheme", "always") != "never":
        component["prepend_scheme"] = "never"
        component.pop("add_prefix_space", None)  # tokenizers < 0.14's name of it
        return True
    parts = component.get("normalizers") or component.get("pretokenizers") or []
    kept = [p for p in parts if not (p.get("type") == "Prepend" and p.get("prepend") == "▁")]
    dropped = len(kept) < len(parts)
    if dropped:
        component["normalizers" if "normalizers" in component else "pretokenizers"] = kept
    return any([_drop_prefix(p) for p in kept]) or dropped


def special_tokens_of(folder: Path) -> dict[str, str]:
    """The bos_token and eos_token texts of `folder`'s tokenizer_config.json, those it names."""
    return _special_tokens(read_json_object(folder / TOKENIZER_CONFIG))


def _special_tokens(config: dict) -> dict[str, str]:
    return {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}


def _model_specials(tokenizer: Tokenizer, special_tokens: dict[str, str] | None) -> dict[str, str]:
    """<|endoftext|> as bos and eos when the tokenizer has it, but the model's own bos and eos where
    `special_tokens` names them (an imported model's tokenizer_config.json) and the tokenizer has
    them: a token it lacks would be read, and trained on, as plain characters."""
    eot = {"bos_token": EOT, "eos_token": EOT} if tokenizer.token_to_id(EOT) is not None else {}
    own = {k: t for k, t in (special_tokens or {}).items() if tokenizer.token_to_id(t) is not None}
    return eot | own


def _token_text(token: object) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken object with `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None
