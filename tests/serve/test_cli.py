"""`lmforge serve` from the command line: bad arguments are one line of error, before any model is
loaded; the address it prints is the one it listens on."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.errors import LmforgeError
from tests.test_bad_input import assert_one_line_error, usage_error


@pytest.mark.parametrize(("key", "env"), [("", None), (None, " ")], ids=["option", "environment"])
def test_an_empty_api_key_is_a_one_line_error_not_an_open_server(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str | None, env: str | None
) -> None:
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("LMFORGE_API_KEY", env)
    args = [tmp_path / "no-run"] + ([f"--api-key={key}"] if key is not None else [])
    code, _, err = cli("serve", *args)
    assert_one_line_error(
        code, err, "serve", "--api-key is empty" if key is not None else "LMFORGE_API_KEY is empty"
    )


@pytest.mark.parametrize("port", ["65536", "-1", "http"])
def test_a_bad_port_is_a_usage_error(cli, capsys, tmp_path: Path, port: str) -> None:
    code, err = usage_error(cli, capsys, "serve", tmp_path / "no-run", f"--port={port}")
    assert code == 2 and err.splitlines()[-1].startswith("lmforge serve: error: argument --port: ")


def test_compile_without_a_cpp_compiler_is_a_one_line_error(cli, tiny_run: Path, tmp_path: Path) -> None:
    from torch._inductor import config

    # inductor's C++ compilers to try; its own patch, which restores the entry (monkeypatch deletes it)
    with config.patch({"cpp.cxx": (str(tmp_path / "no-compiler"),)}):
        code, _, err = cli("serve", tiny_run, "--compile", "--device", "cpu")
    assert_one_line_error(code, err, "serve", "--compile needs a C++ compiler")


def test_max_autotune_without_compile_is_a_one_line_error(cli, tiny_run: Path) -> None:
    code, _, err = cli("serve", tiny_run, "--max-autotune", "--device", "cpu")
    assert_one_line_error(
        code, err, "serve", "--max-autotune tunes the compiled decode steps: it needs --compile"
    )


def test_a_port_in_use_is_a_one_line_error_and_nothing_said_of_serving(cli, tiny_run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = cli("serve", tiny_run, "--port", port, "--device", "cpu")
    assert out == ""
    assert_one_line_error(code, err, "serve", f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_an_address_not_of_this_machine_is_a_one_line_error(cli, tiny_run: Path) -> None:
    code, _, err = cli("serve", tiny_run, "--host", "192.0.2.1", "--port", "0", "--device", "cpu")
    assert_one_line_error(code, err, "serve", "cannot listen on 192.0.2.1:0: Cannot assign requested address")


def test_port_0_prints_the_port_it_listens_on(tiny_run: Path) -> None:
    command = [sys.executable, "-m", "lmforge", "serve", tiny_run, "--port", "0", "--model-name", "tiny"]
    command = [*map(str, command), "--device", "cpu", "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        found = re.search(
            r" at http://127\.0\.0\.1:(\d+)/ \(playground\) and http://127\.0\.0\.1:(\d+)/v1 ", line
        )
        assert found and found[1] == found[2] and found[1] != "0", line
        deadline = time.monotonic() + 120  # listening already; answering once the engine has loaded
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{found[1]}/v1/models", timeout=10)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["data"][0]["id"] == "tiny"
        server.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()


def test_a_name_of_two_addresses_is_served_on_both_at_one_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--host localhost` where localhost is 127.0.0.1 and ::1 (this machine's /etc/hosts may list only
    one, so the resolver's answer is given): one listening socket each, port 0 the same on both."""
    from lmforge.cli.generate import _listen

    both = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),  # resolvers repeat some
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both)
    sockets = _listen("localhost", 0)
    try:
        assert [s.family for s in sockets] == [socket.AF_INET6, socket.AF_INET]
        port = sockets[0].getsockname()[1]
        assert port != 0 and sockets[1].getsockname()[1] == port
        for family, address in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
            with socket.socket(family) as client:  # not create_connection: it would ask getaddrinfo
                client.settimeout(5)
                client.connect((address, port))
    finally:
        for s in sockets:
            s.close()
    with socket.socket() as taken:  # the second address in use: the first's socket is closed again
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LmforgeError, match=rf"cannot listen on localhost:{port}: Address already in use"):
            _listen("localhost", port)
        with socket.socket(socket.AF_INET6) as probe:  # ::1 at that port is free again
            probe.bind(("::1", port))


def test_an_address_of_a_name_this_machine_lacks_is_skipped_as_asyncio_skips_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--host localhost` where /etc/hosts lists ::1 but IPv6 is off (a container): ::1 cannot be
    bound (EADDRNOTAVAIL), and serve listens on 127.0.0.1 alone, as uvicorn's asyncio server did
    (bpo-30945). 2001:db8::1 (documentation-only) stands for that ::1."""
    from lmforge.cli.generate import _listen

    answer = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answer)
    sockets = _listen("localhost", 0)
    try:
        assert [s.getsockname()[0] for s in sockets] == ["127.0.0.1"]
        with socket.socket() as client:
            client.settimeout(5)
            client.connect(("127.0.0.1", sockets[0].getsockname()[1]))
    finally:
        for s in sockets:
            s.close()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answer[:1])  # none it has
    with pytest.raises(LmforgeError, match=r"cannot listen on localhost:0: Cannot assign requested address"):
        _listen("localhost", 0)


def test_the_ipv6_wildcard_is_ipv6_only_as_asyncio_binds_it() -> None:
    """`--host ::` listens on IPv6 alone, as uvicorn's asyncio server did (IPV6_V6ONLY on every IPv6
    socket): not also on every IPv4 address, where 0.0.0.0 would be asked for."""
    from lmforge.cli.generate import _listen

    (sock,) = _listen("::", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.settimeout(5)
            client.connect(("127.0.0.1", sock.getsockname()[1]))
    finally:
        sock.close()
