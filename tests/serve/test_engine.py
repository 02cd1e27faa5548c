"""The decoding engine: batched rows never see each other, slots are freed, the queue is bounded."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.inference import InferenceSession, load
from lmforge.inference.sampling import SamplingOptions, TextRules
from lmforge.serve.engine import (
    ERROR,
    LENGTH,
    STOP,
    Engine,
    EngineStopped,
    Job,
    Params,
    QueueFull,
    Update,
    decode_buckets,
    prefill_groups,
)
from tests.inference.test_session import sentencepiece_session


class SlowModel(torch.nn.Module):
    """A model that takes `delay` seconds per forward: requests stay in their slots long enough to watch."""

    def __init__(self, model: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.model, self.config, self.delay = model, model.config, delay

    def forward(self, *args: object, **kwargs: object) -> object:
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


def slow(sampler: InferenceSession, delay: float = 0.05) -> InferenceSession:
    return dataclasses.replace(sampler, model=SlowModel(sampler.model, delay))


def run_jobs(
    engine: Engine, prompts: list[list[int]], params: Params | list[Params]
) -> list[tuple[str, str, int]]:
    """Submit every prompt at once (with `params`, or params[i] each); (text, finish_reason, tokens)
    of each, in order."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    received: list[queue.Queue[Update]] = [queue.Queue() for _ in prompts]
    engine.submit([Job(prompt, p, received[i].put) for i, (prompt, p) in enumerate(zip(prompts, each))])
    return [collect(updates) for updates in received]


def collect(updates: queue.Queue[Update]) -> tuple[str, str, int]:
    """(text, finish_reason, tokens) of one job, once it has finished."""
    text, update = "", Update("", None, 0)
    while update.finish_reason is None:
        update = updates.get(timeout=30)
        text += update.text
    return text, update.finish_reason, update.completion_tokens


GREEDY = Params(max_tokens=20, temperature=0.0, top_p=None, seed=0)


class CountingModel(torch.nn.Module):
    """A model that records the shape of each forward's tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.shapes = model, model.config, []

    def forward(self, idx: torch.Tensor, *args: object, **kwargs: object) -> object:
        self.shapes.append(tuple(idx.shape))
        return self.model(idx, *args, **kwargs)


def test_requests_waiting_together_are_prefilled_in_one_forward_and_decode_as_alone(
    sampler: InferenceSession,
) -> None:
    counting = CountingModel(sampler.model)
    engine = Engine(dataclasses.replace(sampler, model=counting), max_batch=4)  # not started: they wait
    prompts = [sampler.prompt_ids(text) for text in ("to be", "or no", "a", "the question: whether")]
    received: list[queue.Queue[Update]] = [queue.Queue() for _ in prompts]
    engine.submit([Job(prompt, GREEDY, received[i].put) for i, prompt in enumerate(prompts)])
    engine.start()
    try:
        together = [collect(updates) for updates in received]
    finally:
        engine.close()
    # "to be", "or no" and "a" (5, 5, 1 tokens) in one padded forward; 21 tokens are not padded to for 1
    assert [shape for shape in counting.shapes if shape[1] > 1] == [(3, 5), (1, 21)]
    alone = Engine(sampler, max_batch=1).start()
    try:
        assert together == [run_jobs(alone, [prompt], GREEDY)[0] for prompt in prompts]
    finally:
        alone.close()


class FailingPrefill(CountingModel):
    """A model whose prefills (more than one token) raise: a bug, as the engine sees it."""

    def forward(self, idx: torch.Tensor, *args: object, **kwargs: object) -> object:
        if idx.size(1) > 1:
            raise RuntimeError("a bug in the prefill")
        return super().forward(idx, *args, **kwargs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requests_whose_prefill_fails_end_with_an_error_instead_of_waiting_forever(
    sampler: InferenceSession,
) -> None:
    engine = Engine(dataclasses.replace(sampler, model=FailingPrefill(sampler.model)), max_batch=4)
    prompts = [sampler.prompt_ids(text) for text in ("to be", "a", "or not to be, that is")]
    received: list[queue.Queue[Update]] = [queue.Queue() for _ in prompts]
    engine.submit([Job(prompt, GREEDY, received[i].put) for i, prompt in enumerate(prompts)])
    engine.start()
    try:
        assert [collect(updates)[1] for updates in received] == ["error"] * 3
    finally:
        engine.close()


def test_prefill_groups_pad_each_prompt_to_at_most_twice_the_tokens_they_hold() -> None:
    assert prefill_groups([16] * 8) == [list(range(8))]
    assert prefill_groups([5, 21, 1, 5]) == [[2, 0, 3], [1]]  # 3 x 5 = 15 <= 2 x 11; 4 x 21 > 2 x 32
    assert prefill_groups([100, 1, 1, 1]) == [[1, 2, 3], [0]]
    assert prefill_groups([]) == []


def alone_and_batched(sampler: InferenceSession, prompts: list[list[int]]) -> tuple[list, list]:
    """Greedy (text, finish_reason, tokens) of each prompt decoded alone, then all decoded together."""
    alone = Engine(sampler, max_batch=1).start()
    together = Engine(sampler, max_batch=4).start()
    try:
        solo = [run_jobs(alone, [prompt], GREEDY)[0] for prompt in prompts]
        return solo, run_jobs(together, prompts, GREEDY)
    finally:
        alone.close()
        together.close()


def test_a_request_decodes_the_same_alone_or_batched_with_others_of_other_lengths(
    sampler: InferenceSession,
) -> None:
    prompts = [
        sampler.prompt_ids(text) for text in ("to be", "or not to be, that", "a", "the question: whether")
    ]
    solo, batched = alone_and_batched(sampler, prompts)
    assert batched == solo
    # and both are what `lmforge sample` (generate() with its own KV cache) writes
    options = SamplingOptions(max_new_tokens=20, temperature=0.0, top_k=None, top_p=None)
    for prompt, (text, _, _) in zip(prompts, solo):
        assert "".join(sampler.complete(prompt, options, torch.Generator())) == text


def test_a_bf16_session_decodes_rows_batched_as_alone(tiny_run: Path) -> None:
    """Under bf16 autocast the keys are bf16 and the cache holds the weights' fp32: a batched step's
    per-row write must cast them, as the slice writes of a prefill do."""
    sampler = load(tiny_run, "last", "cpu", dtype="bf16")
    prompts = [sampler.prompt_ids(text) for text in ("to be", "or not to be, that", "a")]
    solo, batched = alone_and_batched(sampler, prompts)
    assert ERROR not in [reason for _, reason, _ in batched] and batched == solo


def test_finish_reasons_stop_length_and_the_context(sampler: InferenceSession) -> None:
    engine = Engine(sampler).start()
    try:
        prompt = sampler.prompt_ids("to be")
        ((text, reason, tokens),) = run_jobs(engine, [prompt], dataclasses.replace(GREEDY, max_tokens=7))
        assert (reason, tokens) == (LENGTH, 7)
        stop = text[3:5]  # a stop string that the greedy text contains
        ((stopped, reason, _),) = run_jobs(
            engine, [prompt], dataclasses.replace(GREEDY, text=TextRules((stop,)))
        )
        assert reason == STOP and stopped == text[: text.index(stop)]
        full = sampler.prompt_ids("x" * 60)  # 4 tokens of room in a 64-token context
        ((_, reason, tokens),) = run_jobs(engine, [full], dataclasses.replace(GREEDY, max_tokens=50))
        assert (reason, tokens) == (LENGTH, 5)  # the 5th token is chosen but never needs feeding
    finally:
        engine.close()


def test_a_completion_keeps_the_space_before_its_first_word() -> None:
    """Decoded after its prompt, not as the start of a text (SentencePiece's decoders strip that space)."""
    session, prompt, expected = sentencepiece_session()
    engine = Engine(session, max_batch=2).start()
    try:
        ((text, _, _),) = run_jobs(engine, [prompt], dataclasses.replace(GREEDY, max_tokens=4))
    finally:
        engine.close()
    assert text == expected and text.startswith(" ")


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(sampler: InferenceSession) -> None:
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


def test_a_full_queue_refuses_requests_all_or_none(sampler: InferenceSession) -> None:
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
    with pytest.raises(ValueError, match="queue holds 2"):  # could never fit: not "try again later"
        engine.submit([job(), job(), job()])


def test_a_job_cancelled_while_waiting_gives_its_place_up(sampler: InferenceSession) -> None:
    engine = Engine(slow(sampler), max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    gone = Job([1], GREEDY, lambda update: None)
    engine.submit([gone])
    with pytest.raises(QueueFull):
        engine.submit([Job([1], GREEDY, lambda update: None)])
    gone.cancel()  # its client disconnected while it waited
    engine.submit([Job([2], GREEDY, lambda update: None)])
    assert [job.prompt for job in engine.waiting] == [[2]]


def _die() -> None:
    raise SystemExit  # not an Exception: what no request causes, and the engine's loop cannot absorb


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stopped_engine_refuses_jobs_instead_of_queueing_them_forever(sampler: InferenceSession) -> None:
    closed = Engine(sampler).start()
    closed.close()
    with pytest.raises(EngineStopped):
        closed.submit([Job([1], GREEDY, lambda update: None)])
    dead = Engine(sampler)
    dead._admit = _die  # the engine's thread dies
    received: queue.Queue[Update] = queue.Queue()
    dead.start().submit([Job([1], GREEDY, received.put)])
    assert received.get(timeout=10).finish_reason == "error"  # the job in hand fails, and is told so
    dead.thread.join(10)
    with pytest.raises(EngineStopped):
        dead.submit([Job([1], GREEDY, lambda update: None)])


def test_slots_are_reused_mid_batch_and_each_request_decodes_as_alone(sampler: InferenceSession) -> None:
    texts = ("to be", "or not to be, that", "a", "the question: whether", "x")
    prompts = [sampler.prompt_ids(text) for text in texts]
    params = [
        dataclasses.replace(GREEDY, max_tokens=n) for n in (3, 12, 5, 9, 7)
    ]  # finish at staggered steps
    alone = Engine(sampler, max_batch=1).start()
    two = Engine(sampler, max_batch=2).start()
    try:
        solo = [run_jobs(alone, [prompt], p)[0] for prompt, p in zip(prompts, params)]
        batched = run_jobs(two, prompts, params)
    finally:
        alone.close()
        two.close()
    assert batched == solo and [tokens for _, _, tokens in batched] == [3, 12, 5, 9, 7]


def test_sampling_with_a_seed_is_the_same_batched_or_alone(sampler: InferenceSession) -> None:
    prompts = [sampler.prompt_ids(text) for text in ("to be", "or not", "a", "the question")]
    hot = [Params(max_tokens=15, temperature=1.3, top_p=0.9, seed=seed, top_k=20) for seed in (1, 2, 3, 4)]
    alone = Engine(sampler, max_batch=1).start()
    together = Engine(sampler, max_batch=4).start()
    try:
        solo = [run_jobs(alone, [prompt], p)[0] for prompt, p in zip(prompts, hot)]
        batched = run_jobs(together, prompts, hot)
    finally:
        alone.close()
        together.close()
    assert batched == solo and len({text for text, _, _ in solo}) == 4


@pytest.mark.slow  # 3 decode graphs compiled: ~21 s on a quiet 2-core EPYC
def test_compiled_decode_steps_write_the_eager_text_at_every_batch_size_and_never_recompile(
    sampler: InferenceSession,
) -> None:
    from torch._dynamo.utils import counters

    texts = ("to be", "or not to be, that", "a", "the question: whether", "x")
    prompts = [sampler.prompt_ids(text) for text in texts]
    # 4 rows, then 3 (padded to the bucket of 4), 2 and 1 as they finish at staggered steps
    params = [dataclasses.replace(GREEDY, max_tokens=n) for n in (3, 12, 5, 9, 7)]
    eager = Engine(sampler, max_batch=4).start()
    graphs = counters["stats"]["unique_graphs"]
    compiled = Engine(sampler, max_batch=4, compile=True).start()  # returns once compiled
    try:
        assert compiled.buckets == [1, 2, 4]
        assert counters["stats"]["unique_graphs"] - graphs == 3  # a graph per bucket, all at start
        expected = run_jobs(eager, prompts, params)
        assert run_jobs(compiled, prompts, params) == expected
        assert run_jobs(compiled, prompts[1:2], params[1]) == expected[1:2]  # one row alone
        assert run_jobs(compiled, prompts[:2], params[:2]) == expected[:2]  # two rows
        assert counters["stats"]["unique_graphs"] - graphs == 3  # no recompile after start
    finally:
        eager.close()
        compiled.close()
    options = SamplingOptions(max_new_tokens=12, temperature=0.0, top_k=None, top_p=None)
    assert "".join(sampler.complete(prompts[1], options, torch.Generator())) == expected[1][0]


@pytest.mark.slow  # inductor's GEMMs timed for one graph's shapes
def test_max_autotune_decode_steps_write_the_eager_text(sampler: InferenceSession) -> None:
    # the weights frozen into the graph and inductor's GEMM kernels chosen by timing: the same tokens
    prompts = [sampler.prompt_ids(text) for text in ("to be", "or not to be, that")]
    params = [dataclasses.replace(GREEDY, max_tokens=n) for n in (6, 9)]
    eager = Engine(sampler, max_batch=1).start()
    tuned = Engine(sampler, max_batch=1, compile=True, max_autotune=True).start()
    try:
        assert run_jobs(tuned, prompts, params) == run_jobs(eager, prompts, params)
    finally:
        eager.close()
        tuned.close()


def test_decode_buckets_are_powers_of_two_up_to_the_batch() -> None:
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(1) == [1]
