"""A fork server: one process imports what a command needs once, then forks a child per call.

tests/docs/test_docs.py runs the docs' blocks, about 70 `lmforge` commands; as separate processes each
paid 1.5-4 s for `import torch` (and transformers, peft, torchao) before doing a second of work. Here
`serve(path, run)` imports once and listens on a unix socket; `call(path, argv)` is what a command's
process does instead: it passes its arguments, working directory, environment and its stdin, stdout
and stderr (the descriptors themselves, SCM_RIGHTS) and returns the exit status of a forked child
that set all of them up and ran `run(argv)`. The child is the command's process in all but its
imports: its own pid, descriptors, cwd and `os.environ`; what it writes goes where the caller's
output goes. So the server must do nothing before forking that a fork does not copy: start a thread
(torch's OpenMP pool starts with the first parallel op, so no tensor op runs in the server), or read
the environment into a module constant (lmforge reads its LMFORGE_* variables when it uses them).
What the C runtime and libraries read once, at load (OMP_NUM_THREADS, PYTHONHASHSEED, ...), is the
server's: a `run` sets what differs itself (tests/docs/toy_lmforge.py sets torch's thread count).

Signals: SIGINT, SIGTERM and SIGHUP sent to the caller are passed on to the child; if the caller
dies, the child is killed. A child killed by a signal makes the caller die of the same signal.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

HEADER = struct.Struct("!I")  # the length of the JSON request that follows the descriptors
STATUS = struct.Struct("!i")  # the child's exit status, or minus the signal that killed it
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STD_FDS = (0, 1, 2)


def call(path: str, argv: list[str]) -> int:
    """Run `argv` in a child of the server at `path`, as this process would run it; its exit status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(path)
        except OSError as exc:
            print(f"no fork server at {path}: {exc.strerror}", file=sys.stderr)
            return 1
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [HEADER.pack(len(request))], list(STD_FDS))
        conn.sendall(request)

        def pass_on(signum: int, _frame: object) -> None:  # to the child: one byte, its number
            with contextlib.suppress(OSError):
                conn.send(bytes([signum]))

        previous = {sig: signal.signal(sig, pass_on) for sig in FORWARDED}
        try:
            (status,) = STATUS.unpack(_receive_exactly(conn, STATUS.size))
        except ConnectionError:
            print("the fork server closed the connection", file=sys.stderr)
            return 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if status < 0:  # killed by a signal: die of it too, as the shell expects of a killed command
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


@dataclass
class _Call:
    """A call being run: the caller's connection, the worker's pid and a descriptor of its exit."""

    conn: socket.socket
    pid: int
    exited: int  # a pidfd: readable once the worker has exited


def serve(path: str, run: Callable[[list[str]], int]) -> None:
    """Accept calls on the unix socket `path` until SIGTERM; each runs in a child of its own."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # What is loaded stays shared with the children: a collection in a child would touch every
    # object (and so copy every page) of the server's heap
    gc.collect()
    gc.freeze()
    calls: dict[int, _Call] = {}  # by both its connection's descriptor and its pidfd
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(64)
        print("listening", flush=True)  # the starter waits for this line
        try:
            while True:
                readable, _, _ = select.select([listener.fileno(), *calls], [], [])
                for fd in readable:
                    if fd == listener.fileno():
                        call = _start(listener.accept()[0], run, others=[listener.fileno(), *calls])
                        calls[call.conn.fileno()] = calls[call.exited] = call
                    elif fd in calls:
                        _handle(fd, calls)
        finally:
            for call in calls.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(call.pid, signal.SIGKILL)


def _start(conn: socket.socket, run: Callable[[list[str]], int], *, others: list[int]) -> _Call:
    """Receive a call on `conn` and fork the worker that runs it; `others`: the server's descriptors,
    which the worker closes (holding another call's connection open would hide its caller's end)."""
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, len(STD_FDS))
    request = json.loads(_receive_exactly(conn, HEADER.unpack(header)[0]))
    pid = os.fork()
    if pid == 0:
        for fd in [conn.fileno(), *others]:
            os.close(fd)
        _worker(request, fds, run)  # never returns
    for fd in fds:
        os.close(fd)
    return _Call(conn, pid, os.pidfd_open(pid))


def _handle(fd: int, calls: dict[int, _Call]) -> None:
    """The worker of a call exited: tell the caller how. Or the caller sent signals: pass them on;
    or it went away: kill the worker."""
    call = calls[fd]
    if fd == call.exited:
        status = os.waitstatus_to_exitcode(os.waitpid(call.pid, 0)[1])
        with contextlib.suppress(OSError):  # the caller is gone: nobody to tell
            call.conn.sendall(STATUS.pack(status))
        calls.pop(call.exited)
        calls.pop(call.conn.fileno(), None)
        os.close(call.exited)
        call.conn.close()
        return
    message = call.conn.recv(64)
    if not message:  # the caller died: so does the call; its exit is still awaited, to reap it
        calls.pop(fd)
    for signum in message or [signal.SIGKILL]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(call.pid, signum)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return data


def _worker(request: dict, fds: list[int], run: Callable[[list[str]], int]) -> None:
    """The call's process: the caller's descriptors, cwd and environment, then `run`, then exit as
    the interpreter would (atexit handlers, flushed streams)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's way out is not the worker's
    for target, fd in zip(STD_FDS, fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as Python sets it up at start
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [sys.argv[0], *request["argv"]]
    signum = None
    try:
        status = run(request["argv"])
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except BaseException as exc:
        traceback.print_exc()
        status = 1
        if isinstance(exc, KeyboardInterrupt):  # as Python ends on an uncaught Ctrl-C: by SIGINT
            signum = signal.SIGINT
    atexit._run_exitfuncs()
    _flush_and_die(signum, status)


def _exit_status(code: object) -> int:
    """What `sys.exit(code)` makes the exit status: None 0, an int itself, else printed and 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _flush_and_die(signum: int | None, status: int) -> None:
    """End the worker: killed by `signum` where given, else with exit `status`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: the interpreter would say nothing either
    if signum is not None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(status & 0xFF)
