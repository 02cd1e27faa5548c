"""`lmforge serve` through the official `openai` client and raw HTTP, against a live loopback server."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lmforge.data.chat_template import ChatTemplate, encode_segments
from lmforge.inference import InferenceSession
from lmforge.inference.sampling import SamplingOptions
from lmforge.serve.api import ResponseShape, _merge_updates, _sse
from lmforge.serve.engine import Update
from tests.serve.conftest import MODEL, LiveServer, serve
from tests.serve.test_engine import slow


def client(live: LiveServer, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def greedy(sampler: InferenceSession, prompt: str, max_tokens: int) -> str:
    """What `lmforge sample --temperature 0` writes after `prompt`."""
    options = SamplingOptions(max_new_tokens=max_tokens, temperature=0.0, top_k=None, top_p=None)
    return "".join(sampler.complete(sampler.prompt_ids(prompt), options, torch.Generator()))


def test_models_lists_the_served_model(server: LiveServer) -> None:
    (model,) = client(server).models.list().data
    assert model.id == MODEL and model.owned_by == "lmforge"


def test_completion_is_lmforge_samples_greedy_text_with_usage(
    server: LiveServer, sampler: InferenceSession
) -> None:
    response = client(server).completions.create(model=MODEL, prompt="to be", max_tokens=12, temperature=0)
    (choice,) = response.choices
    assert choice.text == greedy(sampler, "to be", 12) and choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        5,
        12,
        17,
    )


class GatedModel(torch.nn.Module):
    """A model whose every forward waits for a permit: the test decides how many tokens exist when."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.permits = model, model.config, threading.Semaphore(0)

    def forward(self, *args: object, **kwargs: object) -> object:
        if not self.permits.acquire(timeout=30):
            raise TimeoutError("the test gave no permit for this forward")
        return self.model(*args, **kwargs)


def test_streamed_completion_is_the_same_text_in_pieces(sampler: InferenceSession) -> None:
    gated = GatedModel(sampler.model)
    expected = greedy(sampler, "to be", 12)
    with serve(dataclasses.replace(sampler, model=gated)) as live:
        gated.permits.release()  # one forward: the prompt's, which yields the first token
        stream = client(live).completions.create(
            model=MODEL,
            prompt="to be",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        first = next(chunks)
        # The first piece arrives while the engine waits for the next permit: the reply streams. How
        # the rest is cut into chunks depends on thread timing, so only their sum is checked.
        assert (
            first.choices[0].text
            and expected.startswith(first.choices[0].text)
            and first.choices[0].text != expected
        )
        gated.permits.release(100)
        rest = list(chunks)
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices) == expected
    assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 12


def test_chat_renders_the_checkpoint_template_streamed_or_not(
    server: LiveServer, sampler: InferenceSession
) -> None:
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hello"}]
    api = client(server)
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    template = ChatTemplate.of_checkpoint(sampler.checkpoint, sampler.tokenizer)
    (encoded,) = encode_segments(sampler.tokenizer, [template.segments(messages, add_generation_prompt=True)])
    assert whole.usage.prompt_tokens == len(encoded.ids)
    chunks = list(
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_seed_makes_sampling_reproducible_and_n_choices_differ(server: LiveServer) -> None:
    api = client(server)
    ask = lambda seed: api.completions.create(  # noqa: E731
        model=MODEL, prompt="to be", max_tokens=16, temperature=1.5, n=2, seed=seed
    )
    first, again, other = ask(7), ask(7), ask(8)
    texts = lambda r: [c.text for c in sorted(r.choices, key=lambda c: c.index)]  # noqa: E731
    assert texts(first) == texts(again) and texts(first) != texts(other)
    assert texts(first)[0] != texts(first)[1] and first.usage.completion_tokens == 32


def test_stop_strings_end_the_text_before_them(server: LiveServer, sampler: InferenceSession) -> None:
    text = greedy(sampler, "to be", 20)
    stops = [text[6:8], "never there"]
    response = client(server).completions.create(
        model=MODEL, prompt="to be", max_tokens=20, temperature=0, stop=stops
    )
    assert response.choices[0].text == text[: text.index(stops[0])]
    assert response.choices[0].finish_reason == "stop"


def test_concurrent_clients_each_get_their_solo_greedy_text(
    server: LiveServer, sampler: InferenceSession
) -> None:
    prompts = ["a", "to be or", "the", "whether tis nobler", "in the mind", "x", "to suffer", "the slings"]
    api = client(server)

    def ask(prompt: str) -> str:
        return (
            api.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [greedy(sampler, p, 15) for p in prompts]


BAD_FIELDS = [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 1.5}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"logprobs": 3}, "logprobs"),
    ({"logprobs": 0}, "logprobs"),  # a completion's 0 asks for the chosen tokens' logprobs
    ({"frobnicate": True}, "frobnicate"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "caf\u00e9"}, "prompt"),
]

_SURROGATE_MESSAGE = '"messages": [{"role": "user", "content": "a\\udcffb"}]'


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_a_bad_field_is_400_with_openais_error_body(server: LiveServer, fields: dict, param: str) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a"} | fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b"[1, 2]", b"null", b"\xff\xfe", b'{"model": "tiny", "prompt": NaN}']
)
def test_a_malformed_body_is_400(server: LiveServer, body: bytes) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_415_saying_so(server: LiveServer, content_type: str | None) -> None:
    """Refused as OpenAI and vLLM refuse it, not read as JSON anyway: a web page may POST text/plain
    to a server on this machine without the browser asking first (no CORS preflight)."""
    body = json.dumps({"model": MODEL, "prompt": "ab", "max_tokens": 2}).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"] == {
        "message": f"Content-Type must be application/json, got {content_type or 'none'}",
        "type": "invalid_request_error",
        "param": None,
        "code": "unsupported_content_type",
    }


def test_a_json_content_type_with_parameters_or_capitals_is_json(server: LiveServer) -> None:
    body = json.dumps({"model": MODEL, "prompt": "ab", "max_tokens": 2}).encode()
    for content_type in ["application/json; charset=utf-8", "Application/JSON"]:
        response = httpx.post(
            f"{server.url}/v1/completions", content=body, headers={"content-type": content_type}
        )
        assert response.status_code == 200, response.text


def test_chat_message_errors_name_the_field(server: LiveServer) -> None:
    url = f"{server.url}/v1/chat/completions"
    missing = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user"}]}).json()["error"]
    assert missing["param"] == "messages.0.content"
    role = httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).json()[
        "error"
    ]
    assert role["param"] == "messages.0.role"
    other = httpx.post(url, json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_messages_that_render_to_no_tokens_are_400_not_500(sampler: InferenceSession) -> None:
    """A template that writes only the contents (a base model's) turns an empty message into no prompt."""
    raw = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with serve(dataclasses.replace(sampler, template=raw)) as live:
        body = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 2}
        response = httpx.post(f"{live.url}/v1/chat/completions", json=body)
    assert (response.status_code, response.json()["error"]["param"]) == (400, "messages")


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [("completions", '"prompt": "a\\ud800"', "prompt"), ("chat/completions", _SURROGATE_MESSAGE, "messages")],
)
def test_a_lone_surrogate_is_400_not_500(server: LiveServer, path: str, fields: str, param: str) -> None:
    """Valid JSON ("\\ud800" is an escape JSON allows) whose text no tokenizer takes."""
    body = f'{{"model": "{MODEL}", "max_tokens": 2, {fields}}}'.encode()
    response = httpx.post(
        f"{server.url}/v1/{path}", content=body, headers={"content-type": "application/json"}
    )
    assert (response.status_code, response.json()["error"]["param"]) == (400, param)


def test_a_prompt_longer_than_the_context_is_400_context_length_exceeded(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).completions.create(model=MODEL, prompt="a" * 65)
    assert raised.value.status_code == 400 and raised.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 64 tokens. However, your prompt resulted in 65" in raised.value.message
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "a" * 64}]},
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


def test_a_prompt_and_max_tokens_past_the_context_are_400_not_cut(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).completions.create(model=MODEL, prompt="to be", max_tokens=10**12)
    error = raised.value.body
    assert (error["code"], error["param"], error["type"]) == (
        "context_length_exceeded",
        "max_tokens",
        "invalid_request_error",
    )
    assert error["message"] == (
        "This model's maximum context length is 64 tokens. However, you requested 1000000000005 tokens "
        "(5 in the prompt, 1000000000000 for the completion). Please reduce the length of the prompt or "
        "the completion."
    )
    url, body = f"{server.url}/v1/completions", {"model": MODEL, "prompt": "to be", "temperature": 0}
    assert httpx.post(url, json=body | {"max_tokens": 60}).status_code == 400  # 5 + 60 > 64
    fits = httpx.post(url, json=body | {"max_tokens": 59})  # 5 + 59 = 64: the whole context
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] <= 64
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 64},
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_completion_tokens"
    assert "in the messages, 64 for the completion" in chat.json()["error"]["message"]


def test_without_max_tokens_a_reply_gets_what_fits(server: LiveServer, sampler: InferenceSession) -> None:
    api = client(server)
    # completions: OpenAI's 16, or fewer where the context has less room (60 + 4 = 64)
    short = api.completions.create(model=MODEL, prompt="to be", temperature=0)
    assert short.choices[0].text == greedy(sampler, "to be", 16) and short.usage.completion_tokens <= 16
    full = api.completions.create(model=MODEL, prompt="a" * 60, temperature=0)
    assert full.choices[0].text == greedy(sampler, "a" * 60, 4) and full.usage.completion_tokens <= 4
    # chat: the rest of the context, never more
    messages = [{"role": "user", "content": "to be or not to be"}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert reply.usage.total_tokens <= 64
    assert reply.choices[0].finish_reason == "stop" or reply.usage.total_tokens == 64
    # a prompt that fills the context leaves no room for a default completion either
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a" * 64})
    assert response.status_code == 400 and response.json()["error"]["message"].endswith(
        "your prompt resulted in 64 tokens, which leaves no room for the completion. "
        "Please reduce the length of the prompt."
    )


def test_an_api_key_is_required_when_set(sampler: InferenceSession) -> None:
    with serve(sampler, api_key="s3cret") as live:
        with pytest.raises(openai.AuthenticationError):
            client(live, "wrong").models.list()
        assert httpx.get(f"{live.url}/v1/models").status_code == 401
        assert client(live, "s3cret").models.list().data[0].id == MODEL
        assert httpx.get(f"{live.url}/").status_code == 200  # the playground page itself is public


def test_a_full_queue_is_503_with_retry_after(sampler: InferenceSession) -> None:
    with serve(slow(sampler), max_batch=1, max_queue=1) as live, httpx.Client(timeout=60) as http:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 40, "temperature": 0, "stream": True}
        with http.stream("POST", f"{live.url}/v1/completions", json=body) as running:
            next(running.iter_lines())  # generating: the one slot is taken
            with http.stream("POST", f"{live.url}/v1/completions", json=body) as waiting:
                refused = http.post(f"{live.url}/v1/completions", json=body | {"stream": False})
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200


def test_a_client_that_disconnects_frees_its_slot(sampler: InferenceSession) -> None:
    with serve(slow(sampler, 0.2), max_batch=1) as live, httpx.Client(timeout=60) as http:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
        with http.stream("POST", f"{live.url}/v1/completions", json=body) as stream:
            first = next(line for line in stream.iter_lines() if line.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["index"] == 0 and live.engine.busy == 1
        # closed after one token of 60 (12 s at 0.2 s a step); the next request gets the slot at once
        # (a step or two, then its own 3 forwards: about 1 s)
        answer = http.post(
            f"{live.url}/v1/completions", json=body | {"stream": False, "max_tokens": 2}, timeout=5
        )
        assert answer.json()["usage"]["completion_tokens"] == 2


def test_a_client_gone_while_queued_frees_its_place_and_a_503_passes(sampler: InferenceSession) -> None:
    with serve(slow(sampler, 0.2), max_batch=1, max_queue=1) as live, httpx.Client(timeout=60) as http:
        url, body = f"{live.url}/v1/completions", {"model": MODEL, "prompt": "a", "temperature": 0}
        with http.stream("POST", url, json=body | {"max_tokens": 60, "stream": True}) as running:
            next(running.iter_lines())  # the one slot is taken for 12 s
            with http.stream("POST", url, json=body | {"max_tokens": 2, "stream": True}) as queued:
                assert queued.status_code == 200 and len(live.engine.waiting) == 1
                assert http.post(url, json=body).status_code == 503
            # the queued client left: once the server has seen it go, its place is free for a live
            # one, long before the slot is
            deadline = time.monotonic() + 5
            while not all(job.cancelled for job in live.engine.waiting) and time.monotonic() < deadline:
                time.sleep(0.01)
            with http.stream("POST", url, json=body | {"max_tokens": 2, "stream": True}) as again:
                assert again.status_code == 200


def test_more_choices_than_the_queue_holds_is_400_not_a_retry(sampler: InferenceSession) -> None:
    with serve(sampler, max_queue=3) as live:
        url, body = f"{live.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}
        choices = httpx.post(url, json=body | {"n": 4})
        prompts = httpx.post(url, json=body | {"prompt": ["a", "b", "c", "d"]})
        assert (choices.status_code, choices.json()["error"]["param"]) == (400, "n")
        assert (prompts.status_code, prompts.json()["error"]["param"]) == (400, "prompt")
        assert "Retry-After" not in choices.headers
        assert httpx.post(url, json=body | {"n": 3}).status_code == 200


def test_a_chunked_body_over_the_limit_is_413_before_it_is_all_read(server: LiveServer) -> None:
    from lmforge.serve.api import MAX_BODY_BYTES

    def body():  # no Content-Length: httpx sends a generator in chunks
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b"a" * 2**20
        yield b'"}'

    response = httpx.post(
        f"{server.url}/v1/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_a_stopped_engine_is_503_not_a_request_that_never_ends(sampler: InferenceSession) -> None:
    with serve(sampler) as live:
        live.engine.close()  # as if its thread had died
        response = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=10)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped"


def test_a_streaming_request_without_the_key_is_401(sampler: InferenceSession) -> None:
    with serve(sampler, api_key="s3cret") as live:
        with pytest.raises(openai.AuthenticationError):
            client(live, "wrong").completions.create(model=MODEL, prompt="a", max_tokens=2, stream=True)


def test_without_a_key_a_foreign_host_name_is_refused(server: LiveServer, sampler: InferenceSession) -> None:
    """A web page on evil.example whose name now points at 127.0.0.1 (DNS rebinding) gets nothing."""
    for path in ("/v1/models", "/"):
        refused = httpx.get(f"{server.url}{path}", headers={"Host": "evil.example:8000"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
    for name in ("localhost:8000", "LOCALHOST", "127.0.0.1", "[::1]:8000"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": name}).status_code == 200
    with serve(sampler, api_key="s3cret") as keyed:  # a key guards the API: any name may reach it
        headers = {"Host": "evil.example", "Authorization": "Bearer s3cret"}
        assert httpx.get(f"{keyed.url}/v1/models", headers=headers).status_code == 200


def test_a_completion_keeps_the_models_leading_whitespace_even_with_a_whitespace_stop(
    server: LiveServer, sampler: InferenceSession
) -> None:
    text = greedy(sampler, "a ", 20)  # this random model writes spaces, then dots
    assert text.startswith("  ") and "." in text
    response = client(server).completions.create(
        model=MODEL, prompt="a ", max_tokens=20, temperature=0, stop=["\n", "."]
    )
    assert response.choices[0].text == text[: text.index(".")]  # exactly the model's text before the stop


def test_top_p_reaches_the_sampler(server: LiveServer, sampler: InferenceSession) -> None:
    api = client(server)
    nucleus = api.completions.create(
        model=MODEL, prompt="to be", max_tokens=12, temperature=1.5, top_p=1e-6, seed=3
    )
    assert nucleus.choices[0].text == greedy(sampler, "to be", 12)  # only the likeliest token is left


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages.0.name"),
        ({"max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens"),
    ],
)
def test_chat_fields_lmforge_cannot_honour_are_400(server: LiveServer, fields: dict, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | fields
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert (response.status_code, response.json()["error"]["param"]) == (400, param)


def test_updates_a_client_has_not_read_yet_merge_per_choice_in_order() -> None:
    a1, a2, a3 = Update("a", None, 1), Update("b", None, 2), Update("c", "stop", 3)
    b1, b2 = Update("x", None, 1), Update("y", None, 2)
    merged = _merge_updates([(0, a1), (0, a2), (1, b1), (1, b2), (0, a3), None])
    assert merged == [(0, Update("ab", None, 2)), (1, Update("xy", None, 2)), (0, a3), None]
    # a finished choice takes nothing after it, and the end (None) is never merged away
    assert _merge_updates([(0, Update("a", None, 1)), (0, a3)]) == [(0, Update("ac", "stop", 3))]
    assert _merge_updates([(0, a3), (0, a1), None, None]) == [(0, a3), (0, a1), None, None]


@pytest.mark.parametrize("chat", [False, True])
def test_a_text_event_is_the_chunk_json_would_write_whatever_the_text_or_model_name(chat: bool) -> None:
    shape = ResponseShape(chat=chat)
    for model in ["tiny", "\x00", 'a "quoted" \\ name']:  # the template's placeholder itself, too
        events = [shape.text_event(model, i) for i in range(2)]
        for text in ["a", "\x00", '"', "\\", "\n\t", "caf\u00e9 \u2603 \U0001f600"]:
            for i in range(2):
                event = events[i](text)
                assert event == _sse(shape.envelope(model, True, choices=[shape.delta(i, text)]))
                choice = json.loads(event.removeprefix("data: "))["choices"][0]
                assert (choice["index"], choice["delta"]["content"] if chat else choice["text"]) == (i, text)
