"""The fork server that runs the docs' `lmforge` commands: a call behaves as a process of its own
(output, exit status, cwd, environment, stdin, signals), with a `run` that needs no torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SERVER = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
import forkserver

def run(argv):
    verb, *rest = argv
    if verb == "show":  # stdout, stderr, cwd, an environment variable, stdin
        print("out", os.getcwd(), os.environ.get("PROBE"), sys.stdin.read().strip())
        print("err", file=sys.stderr)
        return int(rest[0])
    if verb == "exit":
        sys.exit(rest[0])
    if verb == "raise":
        raise ValueError("boom")
    if verb == "sleep":  # writes its pid, then waits for a signal: SIGTERM ends it with exit 7
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        with open(rest[0], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
    return 9

forkserver.serve(sys.argv[1], run)
"""
CLIENT = (
    "import sys; sys.path.insert(0, {here!r}); import forkserver; "
    "sys.exit(forkserver.call({path!r}, sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def client() -> Iterator[list[str]]:
    """The command that calls a fork server running SERVER's `run`."""
    with tempfile.TemporaryDirectory(prefix="forkserver-") as folder:
        path = str(Path(folder) / "socket")
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER.format(here=str(HERE)), path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout.readline() == b"listening\n"
            yield [sys.executable, "-c", CLIENT.format(here=str(HERE), path=path)]
        finally:
            server.terminate()
            server.wait(timeout=60)
            server.stdout.close()


def test_a_call_has_the_callers_output_exit_status_cwd_environment_and_stdin(
    client: list[str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [*client, "show", "3"],
        cwd=tmp_path,
        env={**os.environ, "PROBE": "seen"},
        input="typed",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, f"out {tmp_path} seen typed\n", "err\n")


def test_sys_exit_and_an_uncaught_exception_end_a_call_as_they_end_python(client: list[str]) -> None:
    done = subprocess.run([*client, "exit", "why"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (1, "why\n")
    done = subprocess.run([*client, "raise"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and done.stderr.endswith("ValueError: boom\n")


def _started(client: list[str], pid_file: Path) -> tuple[subprocess.Popen, int]:
    """A call of `sleep`, once it runs: the caller and the worker's pid."""
    caller = subprocess.Popen([*client, "sleep", str(pid_file)])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.01)
    return caller, int(pid_file.read_text())


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not Path(f"/proc/{pid}").exists()


def test_a_signal_to_the_caller_reaches_the_call(client: list[str], tmp_path: Path) -> None:
    caller, worker = _started(client, tmp_path / "pid")
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=60) == 7  # the call's handler of SIGTERM: exit 7
    assert _gone(worker)


def test_a_call_killed_by_a_signal_kills_its_caller_with_it(client: list[str], tmp_path: Path) -> None:
    caller, worker = _started(client, tmp_path / "pid")
    os.kill(worker, signal.SIGHUP)
    assert caller.wait(timeout=60) == -signal.SIGHUP


def test_a_caller_that_dies_takes_its_call_with_it(client: list[str], tmp_path: Path) -> None:
    caller, worker = _started(client, tmp_path / "pid")
    caller.kill()
    caller.wait(timeout=60)
    assert _gone(worker)


def test_a_call_without_a_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    lonely = CLIENT.format(here=str(HERE), path=str(tmp_path / "none"))
    done = subprocess.run([sys.executable, "-c", lonely, "show"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"no fork server at {tmp_path / 'none'}")
