"""The request bodies `lmforge serve` accepts, checked as OpenAI checks them, and the prompts they make.

Fields are validated by pydantic (strict types, no unknown fields); a bad one is answered 400 with
the field named in `param`. OpenAI fields that lmforge does not implement are accepted only at their
neutral value (`echo: false`, `logprobs: null`, penalties 0), so that a client never gets a silent
approximation. Chat messages are rendered with the checkpoint's chat template and cut into tokens as
fine-tuning and `lmforge chat` cut them.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from lmforge.config import SEED_LIMIT
from lmforge.data.chat_template import ChatTemplate, encode_segments
from lmforge.errors import LmforgeError
from lmforge.inference import InferenceSession
from lmforge.inference.sampling import TextRules
from lmforge.serve.engine import Params

MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_CHOICES = 16  # `n`
INT64 = 2**63  # `seed` is any 64-bit integer, as OpenAI's; it is reduced modulo SEED_LIMIT


def _a_bool(value: object) -> object:
    """`logprobs` as a boolean: Literal[False] alone takes 0 too (0 == False), and a completion's
    `logprobs: 0` asks for the chosen tokens' log-probabilities, which lmforge does not return."""
    if not isinstance(value, bool):
        raise ValueError("lmforge does not return log-probabilities: leave it out, or give false")
    return value


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        *,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields completions and chat completions share."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # default 1
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None  # default 1
    top_k: Annotated[int, Field(ge=1)] | None = None  # not OpenAI's; vLLM's and lmforge sample's
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=-INT64, lt=INT64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    logprobs: Annotated[Literal[False], BeforeValidator(_a_bool)] | None = None

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stop if s)

    def check(self) -> None:
        """What pydantic's per-field checks cannot see: fields that go together."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")

    def params(self, max_tokens: int, text: TextRules) -> list[Params]:
        """One Params per choice: choice i draws from seed + i (a random seed when none is given)."""
        seed = self.seed if self.seed is not None else secrets.randbelow(SEED_LIMIT)
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        top_p = None if self.top_p is None or self.top_p == 1 else float(self.top_p)
        return [
            Params(max_tokens, temperature, top_p, (seed + i) % SEED_LIMIT, text, self.top_k)
            for i in range(self.n or 1)
        ]


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # default 16, as OpenAI's, or what fits
    echo: Literal[False] | None = None
    suffix: None = None
    best_of: Literal[1] | None = None

    def prompts(self, sampler: InferenceSession) -> list[list[int]]:
        """Each prompt as token ids: text (empty: the start of a document) or ids in the vocabulary."""
        listed = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if listed and isinstance(listed[0], int):
            listed = [listed]
        vocab = sampler.model.config.vocab_size
        prompts = []
        for prompt in listed:
            if isinstance(prompt, str):
                try:
                    prompts.append(sampler.prompt_ids(prompt))
                except LmforgeError:
                    raise ApiError(
                        400, "'prompt' has characters this model's tokenizer cannot represent", "prompt"
                    ) from None
            elif max(prompt) >= vocab:
                raise ApiError(
                    400, f"'prompt' has token id {max(prompt)}; the vocabulary has {vocab}", "prompt"
                )
            else:
                prompts.append(prompt)
        return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # refused (ChatRequest.check): chat templates have no place for a speaker's name

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # default: the rest of the context
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens

    def requested_tokens(self) -> tuple[int | None, str]:
        """The completion length asked for (None: not given) and the field it was given in."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def check(self) -> None:
        super().check()
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        for i, message in enumerate(self.messages):
            if message.name is not None:
                raise ApiError(
                    400,
                    f"messages.{i}.name: lmforge does not support a speaker's name (the chat template "
                    "has no place for it); put it in the content",
                    f"messages.{i}.name",
                )

    def prompt(self, sampler: InferenceSession, template: ChatTemplate) -> list[int]:
        """The conversation with the generation prompt, as `lmforge chat` tokenizes it."""
        messages = [m.as_template_input() for m in self.messages]
        try:
            segments = template.segments(messages, add_generation_prompt=True)
        except LmforgeError as exc:  # the template refused the conversation (raise_exception)
            raise ApiError(400, str(exc), "messages") from None
        (encoded,) = encode_segments(sampler.tokenizer, [segments])
        if not encoded.exact:
            raise ApiError(
                400, "'messages' have characters this model's tokenizer cannot represent", "messages"
            )
        if not encoded.ids:  # a template that writes only the contents, and empty ones
            raise ApiError(400, "'messages' render to no tokens with this model's chat template", "messages")
        return encoded.ids


def check_context(prompt: list[int], block_size: int, param: str) -> None:
    """A prompt longer than the model's context is refused with 400, as OpenAI and vLLM refuse it."""
    if len(prompt) > block_size:
        raise ApiError(
            400,
            f"This model's maximum context length is {block_size} tokens. However, your {param} resulted "
            f"in {len(prompt)} tokens. Please reduce the length of the {param}.",
            param,
            code="context_length_exceeded",
        )


def fit_max_tokens(
    prompt: list[int], block_size: int, requested: int | None, *, default: int | None, param: str, field: str
) -> int:
    """How many tokens a completion of `prompt` may have: `requested` when prompt and completion fit
    the context together, else 400 as OpenAI and vLLM answer (never a silent cut); when not given,
    `default` (None: the rest of the context) cut to what fits. `param` names the prompt's field
    ("prompt" or "messages"), `field` the one `requested` came in."""
    room = block_size - len(prompt)
    start = f"This model's maximum context length is {block_size} tokens. However, "
    if requested is not None and requested > room:
        raise ApiError(
            400,
            f"{start}you requested {len(prompt) + requested} tokens ({len(prompt)} in the {param}, "
            f"{requested} for the completion). Please reduce the length of the {param} or the completion.",
            field,
            code="context_length_exceeded",
        )
    if requested is None and room < 1:
        raise ApiError(
            400,
            f"{start}your {param} resulted in {len(prompt)} tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {param}.",
            param,
            code="context_length_exceeded",
        )
    if requested is not None:
        return requested
    return room if default is None else min(default, room)
