"""The decoding engine of `lmforge serve`: concurrent requests decoded together, a token per step.

A fixed number of slots (`max_batch`) share one KV cache whose rows hold sequences of different
lengths (`KVCache.length` per row). A request is prefilled straight into a free slot's row (its own
positions from 0; requests waiting together in one forward, `prefill_groups`), and its first token is
chosen at once; then all active slots decode
together, one token each per forward, every row at its own position and attending only to its own
keys, so that no request sees another's tokens. Active rows are kept first in the cache (a
finished row is filled with the last one), so a step computes only the rows in use.

Requests wait for a slot in a bounded queue; a full queue refuses them (QueueFull), a request
that could never fit in it is refused outright (ValueError), and a job cancelled while waiting
gives its place up. Tokens are chosen by `sample_next` with a generator per request and turned
into text by `TextDecoder`: the rules of `lmforge sample` and `lmforge chat`. Everything runs in one
background thread, which reports each request's progress through its callback; `Job.cancel` (a
client gone) frees the slot at the next step. Once that thread has ended (closed, or killed by a
bug), nothing more is accepted (EngineStopped).

With `compile`, decode steps (not the prefill) run through `torch.compile`, one graph per bucket of
rows (`decode_buckets`: 1, 2, 4, 8 for 8 slots): n active rows decode in the smallest bucket that holds
them, the free slots' rows padding it (each decodes a token of its own at position 0, which no request
reads). The number of rows is a constant of each graph, so every graph fuses the small per-layer ops
(rotary, norms, the cache write) that dominate an eager step of a small model; the number of keys
attended over (the longest row's length + 1) is the graphs' one dynamic size, so that a step reads
only the keys in use, not the whole context. Every graph is compiled while the engine starts, so that
no request waits for one and none is compiled later. One graph with a varying number of rows was 1.3x
faster than eager at the demo's size but 2.3x slower at 6 layers of width 384 (benchmarks/RESULTS.md).
With `max_autotune` the weights are constants of the graphs (`DECODE_GRAPH_OPTIONS`).
"""

from __future__ import annotations

import threading
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lmforge.errors import LmforgeError
from lmforge.inference import InferenceSession
from lmforge.inference.generate import sample_next
from lmforge.inference.sampling import TextDecoder, TextRules
from lmforge.model.gpt import KVCache

# inductor's options for the decode graphs on a CPU with `max_autotune`. The weights never change once
# the engine runs, so they are constants of the graphs (`freezing`), which lets inductor pack them once
# for its own matrix kernels (its CPP GEMM template, timed against aten's where it applies): at a few
# rows aten's (MKL's, on a 2-core EPYC) took 4-8x as long at one row and 1.4-2.7x at 8. With the
# attention of `single_query_compiled`, the demo's one-row step fell from 223 to 137 us and its 8-row
# step from 502 to 342 us; 6 x 384's from 3.3 to 1.2 ms and 6.4 to 4.6 ms (benchmarks/RESULTS.md). The
# price: a first start 2-3x longer (each GEMM timed) and the packed copies of the weights beside the
# model's own.
DECODE_GRAPH_OPTIONS = {
    "freezing": True,
    "max_autotune_gemm": True,
    "max_autotune_gemm_backends": "CPP,ATEN",  # aten's where the template does not apply (no AVX2, a dtype)
    "autotune_num_choices_displayed": 0,  # the timings are inductor's business, not the server's log
    "max_autotune_report_choices_stats": False,
}

STOP, LENGTH, ERROR = "stop", "length", "error"  # why a request ended: OpenAI's finish_reason, and ours


class QueueFull(Exception):
    """Every slot is busy and the queue of waiting requests is full: try again later."""


class EngineStopped(Exception):
    """The engine's thread has ended (closed, or a fatal error): no job will ever run."""


@dataclass(frozen=True)
class Params:
    """How one request is generated (checked by the caller)."""

    max_tokens: int
    temperature: float  # 0 is greedy
    top_p: float | None
    seed: int
    text: TextRules = TextRules()  # stops, special tokens, a chat reply's leading blank
    top_k: int | None = None


class Update(NamedTuple):
    """What a request produced since the last update."""

    text: str
    finish_reason: str | None  # None while it goes on
    completion_tokens: int  # tokens generated so far


@dataclass(eq=False)
class Job:
    """One request in the engine: its prompt, options, and where its updates go (called from the
    engine's thread)."""

    prompt: list[int]
    params: Params
    on_update: Callable[[Update], None]
    tokens: int = 0  # generated so far
    length: int = 0  # tokens in its cache row
    last: int = 0  # the newest token, fed at the next step
    cancelled: bool = False
    decoder: TextDecoder | None = None
    generator: torch.Generator | None = None
    on_cancel: Callable[[], None] | None = None  # told of a cancel (a job run by another process)

    def cancel(self) -> None:
        """Stop generating (from any thread): the slot is freed at the engine's next step."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()


@dataclass(eq=False)
class Engine:
    """Slots in one batched KV cache, a queue of waiting jobs, and the thread that decodes them."""

    sampler: InferenceSession
    max_batch: int = 8
    max_queue: int = 64
    active: list[Job] = field(default_factory=list)  # row i of the cache is active[i]
    waiting: deque[Job] = field(default_factory=deque)
    compile: bool = False  # decode steps through torch.compile, a graph per bucket of rows, built at start
    # with `compile` on a CPU: DECODE_GRAPH_OPTIONS, the weights frozen into the graphs and inductor's GEMM
    # kernels timed against aten's (faster steps, a first start 2-3x as long)
    max_autotune: bool = False
    # called from the engine's thread after each step's updates (and after a failure's): a caller that
    # passes updates on elsewhere can send each step's as one message
    after_step: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        model = self.sampler.model
        self.block_size = model.config.block_size
        # compiled, one position more than any row uses: a graph slices the keys to a symbolic length,
        # which may then never equal the cache's (else dynamo guards against it: a recompile there)
        self.cache = KVCache.allocate(model, self.max_batch, self.block_size + self.compile)
        self.lengths = torch.zeros(self.max_batch, dtype=torch.long, device=self.sampler.device)
        # the first n rows of every layer's keys and values, sliced once rather than at every step
        self.rows = [
            ([k[:n] for k in self.cache.keys], [v[:n] for v in self.cache.values])
            for n in range(self.max_batch + 1)
        ]
        # with `compile`, one graph per row count in `buckets`, each on shapes that never change
        # (dynamic=False: a graph with a varying number of rows was the slower one, see the docstring)
        self.buckets = decode_buckets(self.max_batch) if self.compile else []
        self.compiled = torch.compile(self._decode_bucket, dynamic=False) if self.compile else None
        # the compiled step's one dynamic size, the keys it attends over, comes as the length of a slice of
        # this (a Python int would be a constant of the graph: a recompile at every step)
        self.key_span = torch.empty(self.block_size + 1, device=self.sampler.device)
        if self.compile:  # the buckets are graphs of one function: dynamo's limit must not send one to eager
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(self.buckets))
        self.changed = threading.Condition()
        self.stopping = False  # close() was called
        self.ended = False  # the thread has ended: nothing more is accepted
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.warm = threading.Event()  # set once the thread is ready for work (compiled, with `compile`)
        self.warm_up_error: str | None = None

    def start(self) -> Engine:
        """Start the thread; with `compile`, return once the decode step is compiled (EngineStopped
        if it could not be, e.g. without a C++ compiler)."""
        self.thread.start()
        self.warm.wait()
        if self.warm_up_error is not None:
            raise EngineStopped(f"could not compile the decode step: {self.warm_up_error}")
        return self

    def close(self) -> None:
        """Stop the thread; requests still running end with finish_reason "error"."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        if self.thread.is_alive():
            self.thread.join()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` together (the n choices of one request), or none: QueueFull while the queue is
        too full, ValueError if they could never fit in it, EngineStopped once the thread has ended."""
        check_fit(jobs, self.block_size, self.max_queue)
        with self.changed:
            if self.stopping or self.ended:
                raise EngineStopped("the decoding engine has stopped; see the server's log")
            # jobs cancelled while waiting (their clients gone) give their places up
            self.waiting = deque(job for job in self.waiting if not job.cancelled)
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for one of {self.max_batch} slots")
            self.waiting.extend(jobs)
            self.changed.notify()

    @property
    def busy(self) -> int:
        """Slots in use."""
        return len(self.active)

    def _run(self) -> None:
        try:
            with torch.inference_mode(), self.sampler.autocast():
                if not self._warm_up():
                    return
                while self._wait_for_work():
                    try:
                        self._admit()
                        if self.active:
                            self._step()
                    except Exception:  # a bug, not a request's fault: fail the requests, keep serving
                        traceback.print_exc()
                        self._fail_all()
                    self._end_step()
        finally:  # closed, or killed by what no request caused: refuse new jobs, fail those in hand
            with self.changed:
                self.ended = True
            self.warm.set()  # start() must not wait for a thread that died before it was ready
            self._fail_all()
            self._end_step()

    def _end_step(self) -> None:
        if self.after_step is not None:
            self.after_step()

    def _wait_for_work(self) -> bool:
        """Sleep until a job waits or runs; False once the engine is closing."""
        with self.changed:
            while not (self.stopping or self.waiting or self.active):
                self.changed.wait()
            return not self.stopping

    def _admit(self) -> None:
        """Prefill the waiting jobs that free slots can take and choose their first tokens: prompts of
        near lengths in one forward (`prefill_groups`), as the requests of clients that finished
        together arrive together (eight 16-token prompts of the demo's model: 3.2x one, not 8x)."""
        jobs = []
        with self.changed:
            while self.waiting and len(self.active) + len(jobs) < self.max_batch:
                if not (job := self.waiting.popleft()).cancelled:
                    jobs.append(job)
        try:
            for group in prefill_groups([len(job.prompt) for job in jobs]):
                self._prefill([jobs[i] for i in group])
        except Exception:  # those not in a slot yet go back to the queue, where _run's failure finds them
            with self.changed:
                self.waiting.extendleft(reversed([job for job in jobs if job not in self.active]))
            raise

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together into the next free rows, each prompt from position 0 of its own row,
        right-padded to the longest. A shorter prompt's padding comes after its tokens, so causal
        attention keeps it out of them; its keys lie past the row's length, hidden from every decode
        step until the row's own tokens overwrite them."""
        first, longest = len(self.active), max(len(job.prompt) for job in jobs)
        rows = list(range(first, first + len(jobs)))
        view = KVCache(
            [k[first : first + len(jobs)] for k in self.cache.keys],
            [v[first : first + len(jobs)] for v in self.cache.values],
        )
        padded = [job.prompt + [0] * (longest - len(job.prompt)) for job in jobs]
        prompts = torch.tensor(padded, dtype=torch.long, device=self.sampler.device)  # (n, longest)
        logits, _ = self.sampler.model(prompts, cache=view)  # (n, longest, V)
        ends = torch.tensor([len(job.prompt) - 1 for job in jobs], device=self.sampler.device)
        for row, job in zip(rows, jobs):
            self.lengths[row] = job.length = len(job.prompt)
            job.decoder = TextDecoder(
                self.sampler.tokenizer, job.params.text, end_ids=self.sampler.end_ids, context=job.prompt
            )
            job.generator = torch.Generator(device=self.sampler.device).manual_seed(job.params.seed)
            self.active.append(job)
        self._advance(logits[torch.arange(len(jobs)), ends], rows)  # each prompt's last position

    def _step(self) -> None:
        """One token for every active row, decoded together."""
        n = len(self.active)
        last = [[job.last] for job in self.active]
        if self.compiled is not None:
            logits = self._step_compiled(last)
        else:
            tokens = torch.tensor(last, device=self.sampler.device)  # (n, 1)
            longest = max(job.length for job in self.active)  # known here: the cache need not ask the device
            logits = self._decode(tokens, self.lengths[:n], longest)  # lengths advanced in place
        for job in self.active:
            job.length += 1
        self._advance(logits, list(range(n)))

    def _step_compiled(self, last: list[list[int]]) -> torch.Tensor:
        """The logits (n, V) of the n active rows' `last` tokens through the graph of the smallest
        bucket that holds them. The rows past n (free slots) are padding: each decodes a token 0 at
        position 0 of its own row, which no request reads (a prefill writes a slot before it is used)."""
        n = len(last)
        bucket = next(size for size in self.buckets if size >= n)
        if bucket > n:
            self.lengths[n:bucket] = 0  # padding rows stay at position 0, however many steps they pad
            last = last + [[0]] * (bucket - n)
        tokens = torch.tensor(last, device=self.sampler.device)  # (bucket, 1)
        longest = max(job.length for job in self.active)
        # Only the guards that tell the buckets' graphs apart (the rows' shapes) are checked: the rest
        # (weights, cache, dtypes) never change after start-up, and checking them all cost ~0.1 ms, a
        # tenth of a one-row step at the demo's size. The flag's documented use: every graph compiled
        # in a warm-up, none needed after (the tests count them).
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            logits = self.compiled(tokens, self.lengths[:bucket], self._keys_in_use(longest + 1))
        return logits[:n]

    def _keys_in_use(self, end: int) -> torch.Tensor:
        """A tensor of `end` elements, the number of keys the compiled step attends over, marked as
        the graph's dynamic size (2 .. block_size: dynamo always specializes 0 and 1)."""
        keys = self.key_span[:end]
        torch._dynamo.mark_dynamic(keys, 0, min=2, max=self.block_size)
        return keys

    def _decode(self, tokens: torch.Tensor, lengths: torch.Tensor, longest: int) -> torch.Tensor:
        """The next-token logits (n, V) of `tokens` (n, 1), row i's fed at position lengths[i]; the
        forward adds it to the first n rows of the cache and advances `lengths` (a view of
        self.lengths) in place."""
        keys, values = self.rows[tokens.size(0)]
        logits, _ = self.sampler.model(tokens, cache=KVCache(keys, values, lengths, longest))
        return logits[:, -1]

    def _decode_bucket(self, tokens: torch.Tensor, lengths: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`_decode` for torch.compile, attending over keys.size(0) positions: the number of rows is a
        constant of the graph (one graph per bucket), the number of keys a dynamic size."""
        return self._decode(tokens, lengths, keys.size(0) - 1)

    def _warm_up(self) -> bool:
        """With `compile`, compile the decode step of every bucket before any request comes; False if
        that failed. It writes to the cache rows at position 0, which a request's prefill overwrites
        before it reads them."""
        try:
            # a graph is compiled at its first call, under inductor's config of that moment (torch.compile's
            # `options` do not reach freezing)
            # the CPU's options (on CUDA: inductor's defaults, as before them)
            options = DECODE_GRAPH_OPTIONS if self.max_autotune and self.sampler.device.type == "cpu" else {}
            with torch._inductor.config.patch(options), warnings.catch_warnings():
                # inductor's own GEMM timing calls a deprecated storage API; not the server's to report
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                for bucket in self.buckets:
                    tokens = torch.zeros(bucket, 1, dtype=torch.long, device=self.sampler.device)
                    self.lengths[:bucket] = 1  # one token in every row, as at a decode's first step
                    # lengths a view of self.lengths, as at every step (a guard)
                    self.compiled(tokens, self.lengths[:bucket], self._keys_in_use(2))
                    self.lengths.zero_()
            return True
        except Exception as exc:  # reported by start()
            self.warm_up_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return False
        finally:
            self.warm.set()

    def _advance(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Choose the next token of each of `rows` from its logits (len(rows), V), report it, and
        free the rows that are done."""
        jobs = [self.active[row] for row in rows]
        greedy = (
            sample_next(logits, 0.0, None, top_p=None, generator=None).view(-1).tolist()
        )  # one op for every greedy row
        finished = []
        for i, (row, job) in enumerate(zip(rows, jobs)):
            p = job.params
            token = (
                greedy[i]
                if p.temperature == 0
                else int(
                    sample_next(
                        logits[i : i + 1], p.temperature, p.top_k, top_p=p.top_p, generator=job.generator
                    )
                )
            )
            job.last, job.tokens = token, job.tokens + 1
            text = job.decoder.feed(token)
            reason = None
            if job.decoder.done:
                reason = STOP
            elif job.tokens >= job.params.max_tokens or job.length >= self.block_size:
                reason, text = LENGTH, text + job.decoder.finish()
            if text or reason:
                deliver(job, Update(text, reason, job.tokens))
            if reason or job.cancelled:
                finished.append(row)
        for row in sorted(finished, reverse=True):
            self._release(row)
        for row in reversed(range(len(self.active))):  # cancelled while waiting for this step
            if self.active[row].cancelled:
                self._release(row)

    def _release(self, row: int) -> None:
        """Free `row`: the last active row moves into it, so that the active rows stay first."""
        last = len(self.active) - 1
        if row != last:
            length = self.active[last].length
            for cached in (*self.cache.keys, *self.cache.values):  # (max_batch, n_kv_head, max_len, head_dim)
                cached[row, :, :length] = cached[last, :, :length]
            self.lengths[row] = length
            self.active[row] = self.active[last]
        self.active.pop()

    def _fail_all(self) -> None:
        with self.changed:
            jobs = [*self.active, *self.waiting]
            self.active.clear()
            self.waiting.clear()
        for job in jobs:
            deliver(job, Update("", ERROR, job.tokens))


def check_compiler(device: torch.device) -> None:
    """LmforgeError unless torch.compile can build kernels for `device`: on a CPU, inductor writes C++."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, whose message names what it tried
        raise LmforgeError(f"--compile needs a C++ compiler: {str(exc).splitlines()[0]}") from None


def decode_buckets(max_batch: int) -> list[int]:
    """The row counts that a compiled engine has a graph for: the powers of two below `max_batch`,
    then `max_batch` (1, 2, 4, 8 for 8): n active rows run in the smallest that holds them."""
    return [*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch]


def prefill_groups(lengths: Sequence[int], *, waste: float = 2.0) -> list[list[int]]:
    """The indices of prompts of `lengths` grouped for prefills together: by length, each group's
    padded size (its longest x its count) at most `waste` x the tokens it holds, so that one long
    prompt does not make short ones pay its length."""
    groups: list[list[int]] = []
    held = 0  # tokens in the last group
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # a group's last is its longest
        if groups and lengths[i] * (len(groups[-1]) + 1) <= waste * (held + lengths[i]):
            groups[-1].append(i)
            held += lengths[i]
        else:
            groups.append([i])
            held = lengths[i]
    return groups


def check_fit(jobs: Sequence[Job], block_size: int, max_queue: int) -> None:
    """ValueError unless every prompt fits the context and the jobs together fit the queue."""
    for job in jobs:
        if not 0 < len(job.prompt) <= block_size:
            raise ValueError(f"a prompt of {len(job.prompt)} tokens; the context is {block_size}")
    if len(jobs) > max_queue:
        raise ValueError(f"{len(jobs)} jobs at once; the queue holds {max_queue}")


def deliver(job: Job, update: Update) -> None:
    """Give `job` its update; if nobody can take it any more, cancel the job."""
    try:
        job.on_update(update)
    except Exception:  # the receiver is gone (its event loop closed): nobody to tell
        job.cancel()
