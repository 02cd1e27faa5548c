"""A tiny checkpoint and `lmforge serve`'s app running on a loopback port, for the server's tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.inference import InferenceSession, load
from tests.conftest import random_char_run

ALPHABET = "abcdefghijklmnopqrstuvwxyz :.,!?\n"
MODEL = "tiny"  # the name the test servers serve the model under


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised char model with <|endoftext|> and a 64-token context."""
    root = tmp_path_factory.mktemp("serve")
    return random_char_run(root / "run", ALPHABET, n_layer=2, d_model=32, block_size=64)


@pytest.fixture(scope="session")
def sampler(tiny_run: Path) -> InferenceSession:
    return load(tiny_run, "last", "cpu", dtype="fp32")


class LiveServer:
    """An app served by uvicorn in a thread on 127.0.0.1 and a free port, while the `with` lasts."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self) -> object:
        return self.app.state.engine


def serve(sampler: InferenceSession, **options: object) -> LiveServer:
    from lmforge.serve.api import create_app

    return LiveServer(create_app(sampler, MODEL, **options))


@pytest.fixture(scope="module")
def server(sampler: InferenceSession) -> Iterator[LiveServer]:
    """The tiny model served with the defaults (8 slots)."""
    with serve(sampler) as live:
        yield live
