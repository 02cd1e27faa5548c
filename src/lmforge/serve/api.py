"""`lmforge serve`'s HTTP side: OpenAI's /v1/models, /v1/completions and /v1/chat/completions
(streamed as server-sent events with `stream: true`), and the web playground at /.

Every request's choices run as jobs of the one decoding engine (`engine.py`; `lmforge serve` runs
it in a child process, `worker.py`); their text comes back here through the event loop. Every
failure is answered with OpenAI's error body
{"error": {"message", "type", "param", "code"}}: 400 for a bad field or body (or a prompt, or a
prompt and `max_tokens`, that does not fit in the context), 401 for a wrong API key, 404 for another
model's name, 413 for a body over MAX_BODY_BYTES, 503 with
Retry-After when the queue is full (503 without it once the engine has stopped). A client that goes
away cancels its jobs, which frees their slots. Without an API key, only requests addressed to this
machine's own names are served (no DNS rebinding from a web page).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lmforge.data.chat_template import ChatTemplate
from lmforge.inference import InferenceSession
from lmforge.inference.sampling import TextRules
from lmforge.serve.engine import ERROR, Engine, EngineStopped, Job, Params, QueueFull, Update
from lmforge.serve.requests import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Message,
    StreamOptions,
    TextPart,
    check_context,
    fit_max_tokens,
)
from lmforge.serve.worker import EngineProcess

MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413), read no further
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # the names of this machine only
RETRY_AFTER_S = 1  # what a 503 (queue full) tells the client to wait
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (less where the context has less room)
FIELD_NAMES = {
    name
    for model in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
    for name in model.model_fields
}


class Collected(NamedTuple):
    """Each choice's whole text, finish_reason and token count."""

    texts: list[str]
    reasons: list[str | None]
    tokens: list[int]


class CancellingStream(StreamingResponse):
    """An event stream that cancels its generation however it ends, even when the client left
    before the first chunk (the body iterator never started, so its own cleanup never runs)."""

    def __init__(self, events: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


class Generation:
    """The engine jobs of one HTTP request, their updates delivered to its event loop."""

    def __init__(self, engine: Engine | EngineProcess, jobs: list[tuple[list[int], Params]]) -> None:
        loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[tuple[int, Update] | None] = asyncio.Queue()

        def deliver(index: int) -> Callable[[Update], None]:
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
        except EngineStopped as exc:
            raise ApiError(503, str(exc), code="engine_stopped", kind="server_error") from None

    async def __aiter__(self) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) until every job has finished, or the generation is cancelled.
        Updates that arrived while the last was being sent are merged, one per choice in a row: a
        client that reads slower than the engine decodes gets fewer, longer chunks, not a backlog."""
        running = len(self.jobs)
        while running:
            items = [await self.updates.get()]
            while not self.updates.empty():
                items.append(self.updates.get_nowait())
            for item in _merge_updates(items):
                if item is None:
                    return
                running -= item[1].finish_reason is not None
                yield item

    def cancel(self) -> None:
        """Stop every job (freeing its slot) and end the iteration."""
        for job in self.jobs:
            job.cancel()
        self.updates.put_nowait(None)


def _merge_updates(items: list[tuple[int, Update] | None]) -> list[tuple[int, Update] | None]:
    """Consecutive updates of one choice as one: their texts joined, the last one's counts."""
    merged: list[tuple[int, Update] | None] = []
    for item in items:
        last = merged[-1] if merged else None
        if item is not None and last is not None and last[0] == item[0] and last[1].finish_reason is None:
            merged[-1] = (item[0], item[1]._replace(text=last[1].text + item[1].text))
        else:
            merged.append(item)
    return merged


@dataclass
class ResponseShape:
    """How one response and its stream chunks are shaped: a chat's or a completion's, one id and
    one creation time for all its chunks."""

    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

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

    def text_event(self, model: str, index: int) -> Callable[[str], str]:
        """The stream event of a piece of choice `index`'s text, as `_sse` writes its chunk, from a
        template made once: a stream sends one per token, and encoding the whole chunk each time took
        4-9 us, the template 1. The text is the chunk's last string (only nulls follow it), so the
        template is cut at the placeholder's last occurrence, whatever the model's name holds."""
        placeholder = "\x00"
        event = _sse(self.envelope(model, True, choices=[self.delta(index, placeholder)]))
        head, _, tail = event.rpartition(json.dumps(placeholder))
        return lambda text: head + json.dumps(text, ensure_ascii=False) + tail

    def envelope(self, model: str, chunk: bool, **fields: object) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
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

    sampler: InferenceSession
    engine: Engine | EngineProcess
    template: ChatTemplate
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "model",
                code="model_not_found",
                kind="not_found_error",
            )

    async def respond(
        self,
        request: Request,
        body: ChatRequest | CompletionRequest,
        prompts: list[list[int]],
        *,
        max_tokens: list[int],
    ) -> JSONResponse | StreamingResponse:
        """Run n choices of each prompt (of at most `max_tokens` tokens, one count per prompt) and
        answer as one response or one event stream."""
        shape = ResponseShape(chat=isinstance(body, ChatRequest))
        # a chat reply ends at the template's end of turn, which may be a special token, and shows no
        # blank before it; a completion is exactly the model's text, special tokens left out
        text = TextRules.chat_reply(self.template.end_of_turn(), body.stops()) if shape.chat else None
        params = body.params(max_tokens[0], text or TextRules(body.stops()))
        self.check_job_count(len(prompts), len(params))
        jobs = [(prompt, replace(p, max_tokens=n)) for prompt, n in zip(prompts, max_tokens) for p in params]
        generation = Generation(self.engine, jobs)
        prompt_tokens = sum(len(prompt) for prompt in prompts)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return CancellingStream(self._events(shape, generation, prompt_tokens, usage=usage), generation)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            collected = await _collect(generation)
        finally:
            watcher.cancel()
            generation.cancel()
        if ERROR in collected.reasons:
            raise ApiError(500, "generation failed; see the server's log", kind="server_error")
        choices = [
            shape.choice(i, *choice) for i, choice in enumerate(zip(collected.texts, collected.reasons))
        ]
        usage = _usage(prompt_tokens, sum(collected.tokens))
        return JSONResponse(shape.envelope(self.model_name, False, choices=choices, usage=usage))

    def check_job_count(self, prompts: int, n: int) -> None:
        """A request of more choices than the queue can ever hold is refused (400), not told to retry."""
        if prompts * n > self.engine.max_queue:
            raise ApiError(
                400,
                f"{prompts} prompt(s) x n={n} is {prompts * n} choices; this server queues at most "
                f"{self.engine.max_queue} at once",
                "n" if n > 1 else "prompt",
            )

    async def _events(
        self, shape: ResponseShape, generation: Generation, prompt_tokens: int, *, usage: bool
    ) -> AsyncIterator[str]:
        """The stream: a chunk per piece of text, a last chunk per choice with its finish_reason,
        the usage if asked for, then [DONE]. A client that leaves cancels the generation."""

        def chunk(*choices: dict, **extra: object) -> str:
            return _sse(shape.envelope(self.model_name, True, choices=list(choices), **extra))

        tokens = [0] * len(generation.jobs)
        text_events = [shape.text_event(self.model_name, i) for i in range(len(generation.jobs))]
        try:
            if shape.chat:
                for i in range(len(generation.jobs)):
                    yield chunk(shape.delta(i, None))
            async for i, update in generation:
                if update.finish_reason == ERROR:
                    yield _sse(
                        ApiError(500, "generation failed; see the server's log", kind="server_error").body()
                    )
                    return
                tokens[i] = update.completion_tokens
                if update.text:
                    yield text_events[i](update.text)
                if update.finish_reason:
                    yield chunk(shape.delta(i, "", update.finish_reason))
            if usage:
                yield chunk(usage=_usage(prompt_tokens, sum(tokens)))
            yield _sse("[DONE]")
        finally:
            generation.cancel()


async def _collect(generation: Generation) -> Collected:
    n = len(generation.jobs)
    collected = Collected([""] * n, [None] * n, [0] * n)
    async for i, update in generation:
        collected.texts[i] += update.text
        collected.reasons[i], collected.tokens[i] = update.finish_reason, update.completion_tokens
    return collected


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


class BodyTooLarge(HTTPException):
    """A body read past MAX_BODY_BYTES (one sent in chunks says nothing of its size beforehand)."""

    def __init__(self) -> None:
        super().__init__(413, f"the request body is over {MAX_BODY_BYTES} bytes")


class Guard:
    """ASGI middleware before everything: the Host names answered (when `hosts` is given), then for
    the API the key (when set), the size of the body, refused as soon as its Content-Length says
    so or its bytes so far go past the limit, and a POST's Content-Type (JSON). Every refusal is an
    OpenAI error body."""

    def __init__(self, app: ASGIApp, api_key: str | None, hosts: set[str] | None) -> None:
        self.app, self.api_key, self.hosts = app, api_key, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.hosts is not None and _host_name(headers.get(b"host", b"")) not in self.hosts:
            error = ApiError(
                400,
                "this server answers only to its own names (Host: localhost, 127.0.0.1, [::1] or its "
                "--host) unless it has an --api-key",
                code="invalid_host",
            )
            return await _error_response(error)(scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        expected = f"Bearer {self.api_key}".encode()
        if self.api_key is not None and not hmac.compare_digest(headers.get(b"authorization", b""), expected):
            error = ApiError(
                401, "incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )
            return await _error_response(error)(scope, receive, send)
        if int(headers.get(b"content-length", b"0") or 0) > MAX_BODY_BYTES:
            return await _error_response(_body_too_large())(scope, receive, send)
        if scope["method"] == "POST" and (error := _not_json(headers.get(b"content-type"))) is not None:
            return await _error_response(error)(scope, receive, send)
        await self.app(scope, _counting(receive), send)


def _not_json(content_type: bytes | None) -> ApiError | None:
    """415 for a body not sent as JSON (OpenAI and vLLM refuse it too) rather than read as JSON anyway: a
    web page may POST text/plain to this machine without the browser asking first (no CORS preflight)."""
    media_type = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media_type == b"application/json":
        return None
    given = content_type.decode("latin-1") if content_type else "none"
    return ApiError(
        415, f"Content-Type must be application/json, got {given}", code="unsupported_content_type"
    )


def _counting(receive: Receive) -> Receive:
    """`receive` that raises BodyTooLarge once the body's bytes so far are over MAX_BODY_BYTES."""
    received = 0

    async def counted() -> dict:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise BodyTooLarge()
        return message

    return counted


def _body_too_large() -> ApiError:
    return ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")


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
        if isinstance(exc, BodyTooLarge):
            return _error_response(_body_too_large())
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, str(exc.detail), kind=kind))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def _add_guards(app: FastAPI, api_key: str | None, host: str) -> None:
    """The API key and body size; without a key, the Host names this server answers to (Guard)."""
    names = None if api_key is not None else {f"[{n}]" if ":" in n else n for n in {*LOOPBACK_HOSTS, host}}
    app.add_middleware(Guard, api_key=api_key, hosts=names)


def _host_name(header: bytes) -> str:
    """The name in a Host header, without its port: `localhost`, `127.0.0.1`, `[::1]`."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("[") and "]" in host:
        return host[: host.index("]") + 1]
    return host.split(":")[0]


def _make_engine(
    sampler: InferenceSession,
    max_batch: int,
    max_queue: int,
    *,
    own_process: bool,
    threads: int | None,
    compile: bool,
    max_autotune: bool,
) -> Engine | EngineProcess:
    if not own_process:
        return Engine(sampler, max_batch, max_queue, compile=compile, max_autotune=max_autotune)
    block_size = sampler.model.config.block_size
    return EngineProcess(
        sampler.source,
        block_size,
        max_batch,
        max_queue=max_queue,
        threads=threads,
        compile=compile,
        max_autotune=max_autotune,
    )


def _add_generation_routes(
    app: FastAPI, served: Served, sampler: InferenceSession, *, template: ChatTemplate, block_size: int
) -> None:
    """POST /v1/completions and /v1/chat/completions: a prompt and max_tokens past the context are refused."""

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        served.check_model(body.model)
        body.check()
        prompts = body.prompts(sampler)
        for prompt in prompts:
            check_context(prompt, block_size, "prompt")
        fit = dict(default=COMPLETION_MAX_TOKENS, param="prompt", field="max_tokens")
        max_tokens = [fit_max_tokens(prompt, block_size, body.max_tokens, **fit) for prompt in prompts]
        return await served.respond(request, body, prompts, max_tokens=max_tokens)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        served.check_model(body.model)
        body.check()
        prompt = body.prompt(sampler, template)
        check_context(prompt, block_size, "messages")
        requested, given_in = body.requested_tokens()
        max_tokens = fit_max_tokens(
            prompt, block_size, requested, default=None, param="messages", field=given_in
        )
        return await served.respond(request, body, [prompt], max_tokens=[max_tokens])


def create_app(
    sampler: InferenceSession,
    model_name: str,
    *,
    max_batch: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    engine_process: bool = False,
    threads: int | None = None,
    compile: bool = False,
    max_autotune: bool = False,
) -> FastAPI:
    """The server's app; its engine (`app.state.engine`: a child process on `threads` CPU threads with
    `engine_process`, else a thread; its decode step compiled with `compile`, its GEMMs tuned with
    `max_autotune`) runs while the app does.
    Without `api_key`, only requests to this machine (loopback names, or `host`) are answered: a web
    page cannot reach it by a name of its own."""
    block_size = sampler.model.config.block_size
    engine = _make_engine(
        sampler,
        max_batch,
        max_queue,
        own_process=engine_process,
        threads=threads,
        compile=compile,
        max_autotune=max_autotune,
    )
    template = sampler.template
    served = Served(sampler, engine, template, model_name)
    playground = files("lmforge.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(engine.start)  # a child process loads the model first
        yield
        await asyncio.to_thread(engine.close)  # waits for the engine's step: not on the event loop

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    _add_guards(app, api_key, host)
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return playground

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": model_name, "object": "model", "created": served.created, "owned_by": "lmforge"}
        return {"object": "list", "data": [card | {"max_model_len": block_size}]}

    _add_generation_routes(app, served, sampler, template=template, block_size=block_size)
    return app
