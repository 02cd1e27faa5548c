"""`lmforge sample`, `chat` and `serve`: text from a checkpoint, in a terminal or over HTTP."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from lmforge.cli.options import MODEL_SOURCE, SAMPLING, THREADS, Subparsers, positive_int
from lmforge.errors import LmforgeError

API_KEY_ENV = "LMFORGE_API_KEY"  # serve's API key when --api-key is not given
LISTEN_BACKLOG = 2048  # serve's queue of connections not yet accepted: uvicorn's default
STARTUP_FAILURE = 3  # serve's exit status when the app did not start (its error logged): uvicorn.run's


def run_sample(args: argparse.Namespace) -> int:
    from lmforge.inference.sample import stream_samples

    for piece in stream_samples(
        MODEL_SOURCE.build(args),
        prompt=args.prompt,
        options=SAMPLING.build(args),
        seed=args.seed,
        num_samples=args.num_samples,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()  # stream the text as it comes
    return 0


def add_sample(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="generate text from a checkpoint",
        description="Generate text autoregressively with a KV cache, streaming it as it comes.",
    )
    MODEL_SOURCE.add(p)
    THREADS.add(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    SAMPLING.add(p, max_new_tokens=500)
    p.add_argument("--num-samples", type=positive_int, default=1)
    return p


def run_chat(args: argparse.Namespace) -> int:
    from lmforge.chat.repl import start_chat

    options = SAMPLING.build(args)
    chat = start_chat(MODEL_SOURCE.build(args), system=args.system, options=options, seed=args.seed)
    chat.run()
    return 0


def add_chat(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="talk to a model in the terminal, with its chat template",
        description="A terminal chat: each message is rendered with the checkpoint's chat template "
        "(or lmforge's default) and the reply streamed as it is generated. Commands: /reset, "
        "/system TEXT, /temperature X, /quit.",
    )
    MODEL_SOURCE.add(p)
    THREADS.add(p)
    p.add_argument("--system", default="", help="a system message to start with")
    SAMPLING.add(
        p,
        max_new_tokens=None,
        max_new_tokens_help="reply length cap (default: half the context, at most 256)",
    )
    return p


def run_serve(args: argparse.Namespace) -> int:
    api_key = _api_key(args.api_key)
    try:
        import uvicorn

        from lmforge.serve.api import LOOPBACK_HOSTS, create_app
    except ImportError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise LmforgeError(
            f"serve needs the serve extra ({exc.name} is missing): pip install 'lmforge[serve]'"
        ) from None
    from lmforge.serve.engine import check_compiler
    from lmforge.serve.worker import default_threads

    # the engine's process loads the weights; this one needs the tokenizer and configuration only
    session = MODEL_SOURCE.build(args).load(weights=False)
    if args.max_autotune and not args.compile:
        raise LmforgeError("--max-autotune tunes the compiled decode steps: it needs --compile")
    if args.compile:  # here, in one line, rather than from the engine's process as the app starts
        check_compiler(session.device)
    name = args.model_name or Path(args.target).resolve().name
    app = create_app(
        session,
        name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=api_key,
        host=args.host,
        engine_process=True,
        threads=THREADS.build(args) or default_threads(),
        compile=args.compile,
        max_autotune=args.max_autotune,
    )
    sockets = _listen(args.host, args.port)
    try:
        url = f"http://{_address(args.host, sockets[0].getsockname()[1])}"
        print(
            f"serving {session.checkpoint} as {name!r} at {url}/ (playground) and {url}/v1 (OpenAI API); "
            "Ctrl-C stops",
            flush=True,
        )
        if api_key is None and args.host not in LOOPBACK_HOSTS:
            print("warning: reachable beyond this machine without --api-key", file=sys.stderr)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        try:
            server.run(sockets=sockets)
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down cleanly, then raised it again
            pass
    finally:
        for sock in sockets:
            sock.close()
    return 0 if server.started else STARTUP_FAILURE


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address HOST resolves to (`localhost`: 127.0.0.1 and ::1), as
    asyncio's server binds them, all on one port (port 0: the one the first got): so that what serve
    prints is the address it has, and what keeps it from having it is one line. An address this
    machine lacks (::1 with IPv6 off) is skipped, as asyncio skips it, while another one is bound."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:  # a host name that does not resolve
        raise LmforgeError(f"cannot listen on {_address(host, port)}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    found = list(dict.fromkeys(found))  # getaddrinfo may repeat an address
    missing: OSError | None = None  # why the last address skipped could not be had
    try:
        for family, kind, proto, _, address in found:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # a family the kernel lacks (IPv6 not built in)
                missing = exc
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: `::` is not also every IPv4 address
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(
                    (address[0], sockets[0].getsockname()[1] if len(sockets) > 1 else port, *address[2:])
                )
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                missing = exc
                sockets.pop().close()
                continue
            sock.listen(LISTEN_BACKLOG)
        if not sockets:
            raise missing or OSError(errno.EADDRNOTAVAIL, "no address to bind")
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise LmforgeError(f"cannot listen on {_address(host, port)}: {exc.strerror or exc}") from None
    return sockets


def _address(host: str, port: int) -> str:
    """HOST:PORT as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _api_key(given: str | None) -> str | None:
    """serve's API key: --api-key, else $LMFORGE_API_KEY (not shown by `ps`), else none; never empty."""
    key, source = (given, "--api-key") if given is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is not None and not key.strip():
        raise LmforgeError(f"{source} is empty: give a key, or leave it out to serve without one")
    return key


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def add_serve(verbs: Subparsers, name: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        name,
        help="an OpenAI-compatible HTTP server with batched decoding, and a web playground",
        description="Serve a checkpoint over HTTP: GET /v1/models, POST /v1/completions and "
        "/v1/chat/completions (OpenAI's API, streamed with stream: true), and a chat playground at /. "
        "Concurrent requests decode together in one batched KV cache.",
    )
    MODEL_SOURCE.add(p)
    THREADS.add(p, default="one per core but one, which the HTTP side gets")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}, else no key; "
        "the environment keeps it out of `ps`)",
    )
    p.add_argument("--model-name", help="the model's id in the API (default: the run folder's name)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests waiting for a slot before more are refused with 503 (default 64)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode steps with torch.compile before serving, a graph per bucket of 1, 2, 4, "
        "8 ... requests (needs a C++ compiler on a CPU; a first start-up takes minutes on a small "
        "machine, later ones reuse the compile cache; docs/guides/serve-speed.md)",
    )
    p.add_argument(
        "--max-autotune",
        action="store_true",
        help="with --compile on a CPU: freeze the weights into the decode graphs and time inductor's GEMM "
        "kernels against aten's for every shape (faster decode steps; a first start 2-3x as long)",
    )
    return p
