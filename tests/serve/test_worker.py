"""`lmforge serve`'s engine in a child process (`EngineProcess`): the same answers as in one process,
and the parent keeps the queue bound, frees the places of clients that leave, and fails the jobs of
a child that dies. The child is paused with SIGSTOP where a test needs the engine to stand still."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from lmforge.errors import LmforgeError
from lmforge.inference import InferenceSession, ModelSource
from lmforge.serve.worker import EngineProcess
from tests.serve.conftest import MODEL, LiveServer, serve
from tests.serve.test_api import client, greedy

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="pauses the child with SIGSTOP")


@pytest.fixture(scope="module")
def process_server(sampler: InferenceSession) -> Iterator[LiveServer]:
    with serve(sampler, engine_process=True, threads=1) as live:
        yield live


@contextmanager
def paused(live: LiveServer) -> Iterator[None]:
    """The child process stopped (no step runs) while the `with` lasts."""
    os.kill(live.engine.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(live.engine.process.pid, signal.SIGCONT)


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_clients_get_their_solo_greedy_text_streamed_or_not(
    process_server: LiveServer, sampler: InferenceSession
) -> None:
    prompts = ["a", "to be or", "the", "whether tis nobler", "in the mind", "x", "to suffer", "the slings"]
    api = client(process_server)

    def ask(prompt: str) -> str:
        if len(prompt) % 2:
            pieces = api.completions.create(
                model=MODEL, prompt=prompt, max_tokens=15, temperature=0, stream=True
            )
            return "".join(chunk.choices[0].text for chunk in pieces if chunk.choices)
        return (
            api.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [greedy(sampler, p, 15) for p in prompts]
    wait_until(lambda: process_server.engine.busy == 0)


def test_the_parent_bounds_the_queue_and_a_client_gone_frees_its_place(sampler: InferenceSession) -> None:
    with (
        serve(sampler, engine_process=True, max_batch=1, max_queue=1) as live,
        httpx.Client(timeout=60) as http,
    ):
        url, body = f"{live.url}/v1/completions", {"model": MODEL, "prompt": "a", "temperature": 0}
        streamed = body | {"max_tokens": 5, "stream": True}
        with paused(live):
            with (
                http.stream("POST", url, json=streamed) as running,
                http.stream("POST", url, json=streamed) as queued,
            ):
                assert running.status_code == queued.status_code == 200  # one in the slot, one waiting
                refused = http.post(url, json=body)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
            # both clients left while nothing ran: their places are free at once
            wait_until(lambda: not live.engine.jobs)
            with http.stream("POST", url, json=streamed) as again:
                assert again.status_code == 200
        answer = http.post(url, json=body | {"max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_a_child_that_dies_fails_its_jobs_and_then_every_request_is_503(sampler: InferenceSession) -> None:
    with serve(sampler, engine_process=True) as live, httpx.Client(timeout=60) as http:
        url, body = f"{live.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 5}
        with paused(live), http.stream("POST", url, json=body | {"stream": True}) as running:
            os.kill(live.engine.process.pid, signal.SIGKILL)
            events = [line for line in running.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["type"] == "server_error"  # not a hang
        refused = http.post(url, json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"


def test_a_checkpoint_the_child_cannot_load_is_an_error_at_start(tmp_path: Path) -> None:
    engine = EngineProcess(ModelSource(tmp_path / "missing", device="cpu", dtype="fp32"), block_size=16)
    with pytest.raises(LmforgeError, match="could not load"):
        engine.start()
