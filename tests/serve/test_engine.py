"""The decoding engine: batched rows never see each other, slots are freed, the queue is bounded."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import pytest
import torch

from lmforge.sample import Sampler, SamplingOptions
from lmforge.serve.engine import LENGTH, STOP, Engine, Job, Params, QueueFull, Update


class SlowModel(torch.nn.Module):
    """A model that takes `delay` seconds per forward: requests stay in their slots long enough to watch."""

    def __init__(self, model: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.model, self.config, self.delay = model, model.config, delay

    def forward(self, *args: object, **kwargs: object) -> object:
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


def slow(sampler: Sampler, delay: float = 0.05) -> Sampler:
    return dataclasses.replace(sampler, model=SlowModel(sampler.model, delay))


def run_jobs(engine: Engine, prompts: list[list[int]], params: Params) -> list[tuple[str, str, int]]:
    """Submit every prompt at once; (text, finish_reason, tokens) of each, in order."""
    received: list[queue.Queue[Update]] = [queue.Queue() for _ in prompts]
    engine.submit([Job(prompt, params, received[i].put) for i, prompt in enumerate(prompts)])
    results = []
    for updates in received:
        text, update = "", Update("", None, 0)
        while update.finish_reason is None:
            update = updates.get(timeout=30)
            text += update.text
        results.append((text, update.finish_reason, update.completion_tokens))
    return results


GREEDY = Params(max_tokens=20, temperature=0.0, top_p=None, seed=0)


def test_a_request_decodes_the_same_alone_or_batched_with_others_of_other_lengths(sampler: Sampler) -> None:
    prompts = [
        sampler.prompt_ids(text) for text in ("to be", "or not to be, that", "a", "the question: whether")
    ]
    alone = Engine(sampler, max_batch=1).start()
    together = Engine(sampler, max_batch=4).start()
    try:
        solo = [run_jobs(alone, [prompt], GREEDY)[0] for prompt in prompts]
        batched = run_jobs(together, prompts, GREEDY)
    finally:
        alone.close()
        together.close()
    assert batched == solo
    # and both are what `lmforge sample` (generate() with its own KV cache) writes
    options = SamplingOptions(max_new_tokens=20, temperature=0.0, top_k=None, top_p=None)
    for prompt, (text, _, _) in zip(prompts, solo):
        assert "".join(sampler.complete(prompt, options, torch.Generator())) == text


def test_finish_reasons_stop_length_and_the_context(sampler: Sampler) -> None:
    engine = Engine(sampler).start()
    try:
        prompt = sampler.prompt_ids("to be")
        ((text, reason, tokens),) = run_jobs(engine, [prompt], dataclasses.replace(GREEDY, max_tokens=7))
        assert (reason, tokens) == (LENGTH, 7)
        stop = text[3:5]  # a stop string that the greedy text contains
        ((stopped, reason, _),) = run_jobs(engine, [prompt], dataclasses.replace(GREEDY, stops=(stop,)))
        assert reason == STOP and stopped == text[: text.index(stop)]
        full = sampler.prompt_ids("x" * 60)  # 4 tokens of room in a 64-token context
        ((_, reason, tokens),) = run_jobs(engine, [full], dataclasses.replace(GREEDY, max_tokens=50))
        assert (reason, tokens) == (LENGTH, 5)  # the 5th token is chosen but never needs feeding
    finally:
        engine.close()


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(sampler: Sampler) -> None:
    engine = Engine(slow(sampler), max_batch=1).start()
    try:
        first_token = threading.Event()
        long = Job(
            sampler.prompt_ids("a"), dataclasses.replace(GREEDY, max_tokens=60), lambda u: first_token.set()
        )
        engine.submit([long])
        assert first_token.wait(10) and engine.busy == 1
        started = time.monotonic()
        long.cancel()
        assert (
            run_jobs(engine, [sampler.prompt_ids("b")], dataclasses.replace(GREEDY, max_tokens=2))[0][2] == 2
        )
        assert time.monotonic() - started < 2  # far less than the 60 steps the first would have taken
    finally:
        engine.close()


def test_a_full_queue_refuses_requests_all_or_none(sampler: Sampler) -> None:
    engine = Engine(slow(sampler), max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    job = lambda: Job([1], GREEDY, lambda update: None)  # noqa: E731
    engine.submit([job()])
    with pytest.raises(QueueFull):
        engine.submit([job(), job()])  # the n choices of one request go in together or not at all
    engine.submit([job()])
    with pytest.raises(QueueFull):
        engine.submit([job()])
    with pytest.raises(ValueError, match="context"):
        engine.submit([Job([1] * 65, GREEDY, lambda update: None)])
