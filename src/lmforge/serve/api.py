"""`lmforge serve`'s HTTP side: OpenAI's /v1/models, /v1/completions and /v1/chat/completions
(streamed as server-sent events with `stream: true`), and the web playground at /.

Every request's choices run as jobs of the one decoding engine (`engine.py`); their text comes
back here through the event loop. Every failure is answered with OpenAI's error body
{"error": {"message", "type", "param", "code"}}: 400 for a bad field or body, 401 for a wrong API
key, 404 for another model's name, 413 for a prompt longer than the context, 503 with Retry-After
when the queue is full. A client that goes away cancels its jobs, which frees their slots.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.chat.template import ChatTemplate
from lmforge.sample import Sampler
from lmforge.serve.engine import ERROR, Engine, Job, Params, QueueFull, Update
from lmforge.serve.requests import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Message,
    StreamOptions,
    TextPart,
    check_context,
)

MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is read
RETRY_AFTER_S = 1  # what a 503 (queue full) tells the client to wait
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FIELD_NAMES = {
    name
    for model in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
    for name in model.model_fields
}


class Generation:
    """The engine jobs of one HTTP request, their updates delivered to its event loop."""

    def __init__(self, engine: Engine, jobs: list[tuple[list[int], Params]]) -> None:
        loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[tuple[int, Update] | None] = asyncio.Queue()

        def deliver(index: int) -> callable:
            return lambda update: loop.call_soon_threadsafe(self.updates.put_nowait, (index, update))

        self.jobs = [Job(prompt, params, deliver(i)) for i, (prompt, params) in enumerate(jobs)]
        try:
            engine.submit(self.jobs)
        except QueueFull as exc:
            raise ApiError(
                503,
                f"the server is busy ({exc}); retry after {RETRY_AFTER_S} s",
                code="queue_full",
                kind="server_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None

    async def __aiter__(self) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) until every job has finished, or the generation is cancelled."""
        running = len(self.jobs)
        while running:
            item = await self.updates.get()
            if item is None:
                return
            running -= item[1].finish_reason is not None
            yield item

    def cancel(self) -> None:
        """Stop every job (freeing its slot) and end the iteration."""
        for job in self.jobs:
            job.cancel()
        self.updates.put_nowait(None)


@dataclass
class Kind:
    """How one endpoint's responses and stream chunks are shaped."""

    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, index: int, text: str | None, finish: str | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def envelope(self, model: str, chunk: bool, **fields: object) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": int(time.time()),
            "model": model,
            **fields,
        }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Served:
    """The loaded model behind the endpoints."""

    sampler: Sampler
    engine: Engine
    template: ChatTemplate
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
                kind="not_found_error",
            )

    async def respond(
        self,
        request: Request,
        body: ChatRequest | CompletionRequest,
        prompts: list[list[int]],
        max_tokens: int,
    ) -> JSONResponse | StreamingResponse:
        """Run n choices of each prompt and answer as one response or one event stream."""
        kind = Kind(chat=isinstance(body, ChatRequest))
        params = body.params(max_tokens, self.template.end_of_turn() if kind.chat else "")
        generation = Generation(self.engine, [(prompt, p) for prompt in prompts for p in params])
        prompt_tokens = sum(len(prompt) for prompt in prompts)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(kind, generation, prompt_tokens, usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            texts, reasons, tokens = await _collect(generation, kind.chat)
        finally:
            watcher.cancel()
            generation.cancel()
        if ERROR in reasons:
            raise ApiError(500, "generation failed; see the server's log", kind="server_error")
        choices = [kind.choice(i, text, reason) for i, (text, reason) in enumerate(zip(texts, reasons))]
        return JSONResponse(
            kind.envelope(self.model_name, False, choices=choices, usage=_usage(prompt_tokens, sum(tokens)))
        )

    async def _events(
        self, kind: Kind, generation: Generation, prompt_tokens: int, usage: bool
    ) -> AsyncIterator[str]:
        """The stream: a chunk per piece of text, a last chunk per choice with its finish_reason,
        the usage if asked for, then [DONE]. A client that leaves cancels the generation."""

        def chunk(*choices: dict, **extra: object) -> str:
            return _sse(kind.envelope(self.model_name, True, choices=list(choices), **extra))

        tokens, begun = [0] * len(generation.jobs), [not kind.chat] * len(generation.jobs)
        try:
            if kind.chat:
                for i in range(len(generation.jobs)):
                    yield chunk(kind.delta(i, None))
            async for i, update in generation:
                if update.finish_reason == ERROR:
                    yield _sse(
                        ApiError(500, "generation failed; see the server's log", kind="server_error").body()
                    )
                    return
                tokens[i] = update.completion_tokens
                text = update.text if begun[i] else update.text.lstrip()  # no blank before a reply
                begun[i] = begun[i] or bool(text)
                if text:
                    yield chunk(kind.delta(i, text))
                if update.finish_reason:
                    yield chunk(kind.delta(i, "", update.finish_reason))
            if usage:
                yield chunk(usage=_usage(prompt_tokens, sum(tokens)))
            yield _sse("[DONE]")
        finally:
            generation.cancel()


async def _collect(generation: Generation, chat: bool) -> tuple[list[str], list[str | None], list[int]]:
    """Each choice's whole text, finish_reason and token count."""
    n = len(generation.jobs)
    texts, reasons, tokens = [""] * n, [None] * n, [0] * n
    async for i, update in generation:
        texts[i] += update.text
        reasons[i], tokens[i] = update.finish_reason, update.completion_tokens
    return [t.lstrip() if chat else t for t in texts], reasons, tokens


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


class Guard:
    """ASGI middleware before the API: the API key (when set) and the size of the body."""

    def __init__(self, app: object, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            error = None
            expected = f"Bearer {self.api_key}".encode()
            if self.api_key is not None and not hmac.compare_digest(
                headers.get(b"authorization", b""), expected
            ):
                error = ApiError(
                    401, "incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
            elif int(headers.get(b"content-length", b"0") or 0) > MAX_BODY_BYTES:
                error = ApiError(
                    413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large"
                )
            if error is not None:
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem pydantic found, with the field's path (`messages.0.role`) as `param`."""
    first = exc.errors()[0]
    # the field's path, without "body" and the names pydantic gives the members of a union (`str`)
    loc = first.get("loc", ())
    where = [str(part) for part in loc if isinstance(part, int) or part in FIELD_NAMES]
    if first.get("type") == "extra_forbidden":  # a field no lmforge or OpenAI request has
        where.append(str(loc[-1]))
        return ApiError(400, f"unrecognized request argument supplied: {'.'.join(where)}", ".".join(where))
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'invalid')})")
    if not where:
        return ApiError(400, "the body must be a JSON object")
    param = ".".join(where) or None
    return ApiError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, str(exc.detail), kind=kind))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def create_app(
    sampler: Sampler, model_name: str, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None
) -> FastAPI:
    """The server's app; its engine (`app.state.engine`) runs while the app does (its lifespan)."""
    engine = Engine(sampler, max_batch, max_queue)
    template = ChatTemplate.of_checkpoint(sampler.checkpoint, sampler.tokenizer)
    served = Served(sampler, engine, template, model_name)
    block_size = sampler.model.config.block_size
    playground = files("lmforge.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return playground

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": model_name, "object": "model", "created": served.created, "owned_by": "lmforge"}
        return {"object": "list", "data": [card | {"max_model_len": block_size}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        served.check_model(body.model)
        prompts = body.prompts(sampler)
        for prompt in prompts:
            check_context(prompt, block_size, "prompt")
        return await served.respond(request, body, prompts, body.max_tokens or COMPLETION_MAX_TOKENS)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        served.check_model(body.model)
        prompt = body.prompt(sampler, template)
        check_context(prompt, block_size, "messages")
        return await served.respond(
            request, body, [prompt], body.max_tokens or body.max_completion_tokens or block_size
        )

    return app
