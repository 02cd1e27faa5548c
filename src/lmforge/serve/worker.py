"""The decoding engine in a process of its own, so that the model never waits for the HTTP side.

In one process the engine's thread and the event loop share Python's GIL: every PyTorch op lets it
go and takes it back, so each token's HTTP work (the loop waking, a chunk encoded and written) stalls
the model's next step for as long as it runs. Here a spawned child process runs the `Engine`; the
server keeps the same interface (`submit`, `Job.cancel`, `close`, `busy`) through `EngineProcess`,
which sends commands down one pipe and reads the jobs' updates from another in a thread of its own.

The child loads the checkpoint itself. The queue is bounded here, in the parent, from the jobs it
has sent and not yet seen finish; the child queues whatever it is sent. If the child dies, every job
in hand ends with finish_reason "error" and nothing more is accepted (EngineStopped).
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from lmforge.errors import LmforgeError
from lmforge.inference import ModelSource
from lmforge.serve.engine import (
    ERROR,
    Engine,
    EngineStopped,
    Job,
    Params,
    QueueFull,
    Update,
    check_fit,
    deliver,
)

START_TIMEOUT_S = 300  # loading a large checkpoint can take minutes


def default_threads() -> int:
    """The engine's CPU threads unless told: one per core (PyTorch's count) but one, which the HTTP
    side and its clients get; a small model decodes no slower on fewer (benchmarks/serve.py)."""
    import torch

    return max(1, torch.get_num_threads() - 1)


class EngineProcess:
    """An `Engine` in a child process, driven through pipes."""

    def __init__(
        self,
        source: ModelSource,
        block_size: int,
        max_batch: int = 8,
        *,
        max_queue: int = 64,
        threads: int | None = None,
        compile: bool = False,
        max_autotune: bool = False,
    ) -> None:
        self.block_size, self.max_batch, self.max_queue = block_size, max_batch, max_queue
        context = multiprocessing.get_context("spawn")  # a fork would copy the parent's threads' locks
        command_reader, self.commands = context.Pipe(duplex=False)  # (read end, write end)
        self.updates, update_writer = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_child_main,
            args=(command_reader, update_writer, source),
            kwargs={
                "max_batch": max_batch,
                "threads": threads,
                "compile": compile,
                "max_autotune": max_autotune,
            },
            name="lmforge-engine",
            daemon=True,
        )
        self.jobs: dict[int, Job] = {}  # sent and not yet finished
        self.ids = itertools.count()
        self.lock = threading.Lock()  # over `jobs` and writes to `commands`
        self.ended = False
        self.reader = threading.Thread(target=self._read_updates, name="lmforge-engine-updates", daemon=True)

    def start(self) -> EngineProcess:
        """Start the child and wait until its model is loaded (and its decode step compiled, with
        `compile`); its error, if any, is raised here."""
        self.process.start()
        if not self.updates.poll(START_TIMEOUT_S):
            self.process.kill()
            raise LmforgeError(f"the decoding process did not start within {START_TIMEOUT_S} s")
        try:
            kind, message = self.updates.recv()
        except EOFError:
            kind, message = "error", f"the decoding process exited (code {self.process.exitcode})"
        if kind != "ready":
            raise LmforgeError(message)
        self.reader.start()
        return self

    @property
    def busy(self) -> int:
        """Slots in use (jobs running, as far as this side knows)."""
        return min(len(self.jobs), self.max_batch)

    def submit(self, jobs: Sequence[Job]) -> None:
        """As `Engine.submit`: all of `jobs` are queued, or none with QueueFull, ValueError or
        EngineStopped."""
        check_fit(jobs, self.block_size, self.max_queue)
        with self.lock:
            if self.ended:
                raise EngineStopped("the decoding process has stopped; see the server's log")
            waiting = max(0, len(self.jobs) - self.max_batch)
            if waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting for one of {self.max_batch} slots")
            sent = []
            for job in jobs:
                key = next(self.ids)
                self.jobs[key] = job
                job.on_cancel = lambda key=key: self._cancel(key)
                sent.append((key, job.prompt, job.params))
            self._send(("submit", sent))

    def close(self) -> None:
        """Stop the child; jobs still running end with finish_reason "error"."""
        with self.lock:
            if not self.ended:
                self._send(("close", None))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self.reader.is_alive():
            self.reader.join(timeout=30)
        self._end()

    def _cancel(self, key: int) -> None:
        with self.lock:
            if self.jobs.pop(key, None) is not None and not self.ended:
                self._send(("cancel", key))

    def _send(self, command: tuple) -> None:
        """Write a command (the lock held); a child already gone is noticed by the reader."""
        try:
            self.commands.send(command)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass

    def _read_updates(self) -> None:
        """Hand each update to its job until the child's end of the pipe closes."""
        while True:
            try:
                step = self.updates.recv()  # [(key, update), ...]: one step's
            except (EOFError, OSError):
                break
            for key, update in step:
                with self.lock:
                    job = self.jobs.get(key) if update.finish_reason is None else self.jobs.pop(key, None)
                if job is not None:
                    deliver(job, update)
        self._end()

    def _end(self) -> None:
        """Refuse new jobs and fail those in hand."""
        with self.lock:
            self.ended = True
            jobs, self.jobs = list(self.jobs.values()), {}
        for job in jobs:
            deliver(job, Update("", ERROR, job.tokens))


def _child_main(
    commands: Connection,
    updates: Connection,
    source: ModelSource,
    *,
    max_batch: int,
    threads: int | None,
    compile: bool,
    max_autotune: bool,
) -> None:
    """The child: load the checkpoint, then run an Engine on the commands until "close"."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        sampler = source.load()
    except Exception as exc:  # reported to the parent, which refuses to serve
        updates.send(("error", f"the decoding process could not load {source.target}: {exc}"))
        return
    child_jobs = _ChildJobs(updates)
    try:  # the parent bounds the queue
        engine = Engine(
            sampler,
            max_batch,
            max_queue=2**31,
            compile=compile,
            max_autotune=max_autotune,
            after_step=child_jobs.send_step,
        ).start()
    except EngineStopped as exc:
        updates.send(("error", str(exc)))
        return
    updates.send(("ready", ""))
    while True:
        kind, payload = commands.recv()
        if kind == "close":
            break
        if kind == "cancel":
            child_jobs.cancel(payload)
            continue
        try:
            engine.submit(child_jobs.add(payload))
        except EngineStopped:  # its thread has died: once this process ends, the parent fails the jobs
            break
    engine.close()


class _ChildJobs:
    """The child's jobs by the parent's key, and their updates: each engine step's are sent to the
    parent together once the step ends, a pipe write per step rather than per request (each wakes
    the reader, and cost the engine ~0.1 ms on a busy machine)."""

    def __init__(self, updates: Connection) -> None:
        self.updates = updates
        self.jobs: dict[int, Job] = {}  # sent by the parent and not yet finished
        self.lock = threading.Lock()  # over `jobs`: the engine's thread finishes jobs, the child's adds them
        self.pending: list[tuple[int, Update]] = []  # the updates of the engine's current step

    def add(self, payload: list[tuple[int, list[int], Params]]) -> list[Job]:
        """Jobs for the parent's (key, prompt, params) triples, recorded until they finish."""
        submitted = {key: Job(prompt, params, self._reporter(key)) for key, prompt, params in payload}
        with self.lock:
            self.jobs.update(submitted)
        return list(submitted.values())

    def cancel(self, key: int) -> None:
        with self.lock:
            cancelled = self.jobs.pop(key, None)
        if cancelled is not None:
            cancelled.cancel()

    def send_step(self) -> None:
        """Send the step's updates as one message; called from the engine's thread after each step."""
        if self.pending:
            try:
                self.updates.send(self.pending.copy())
            except OSError:  # the parent is gone: so is the commands pipe's far end, which ends this process
                pass
            self.pending.clear()

    def _reporter(self, key: int) -> Callable[[Update], None]:
        def report(update: Update) -> None:  # called from the engine's thread
            if update.finish_reason is not None:
                with self.lock:
                    self.jobs.pop(key, None)
            self.pending.append((key, update))

        return report
