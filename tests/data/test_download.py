"""Downloads of named datasets through a fake `urlopen`: pinned size, deadline, broken connections,
leftovers of interrupted downloads. No network."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from pathlib import Path

import pytest

from lmforge.data import sources
from lmforge.errors import LmforgeError

CONTENT = b"to be or not to be\n" * 100


class FakeResponse:
    """What urlopen returns: read(n) serves `body` in pieces, then `then` (an exception) if given."""

    def __init__(self, body: bytes, then: Exception | None = None, delay: float = 0.0) -> None:
        self.body, self.then, self.delay, self.served = body, then, delay, 0

    def read(self, n: int = -1) -> bytes:
        time.sleep(self.delay)
        if self.served == len(self.body) and self.then is not None:
            raise self.then
        n = len(self.body) - self.served if n is None or n < 0 else min(n, 4096)
        piece = self.body[self.served : self.served + n]
        self.served += len(piece)
        return piece

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> sources.NamedDataset:
    """A named dataset 'toy' pinned to CONTENT, with downloads allowed and no local copy."""
    dataset = sources.NamedDataset(
        "toy", "toy.txt", "https://example.invalid/toy.txt", hashlib.sha256(CONTENT).hexdigest(), len(CONTENT)
    )
    monkeypatch.setitem(sources.NAMED_DATASETS, "toy", (dataset,))
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "nodata"))
    monkeypatch.setenv("LMFORGE_OFFLINE", "0")
    return dataset


def serve(monkeypatch: pytest.MonkeyPatch, response: FakeResponse) -> None:
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout=None: response)


def cached(dataset: sources.NamedDataset) -> Path:
    return sources.cache_dir() / "datasets" / dataset.name / dataset.filename


def leftovers(dataset: sources.NamedDataset) -> list[str]:
    folder = cached(dataset).parent
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_whole_download_is_verified_and_cached(monkeypatch, toy) -> None:
    serve(monkeypatch, FakeResponse(CONTENT))
    assert sources.open_corpus("toy").files == (cached(toy),)
    assert cached(toy).read_bytes() == CONTENT and leftovers(toy) == ["toy.txt"]


def test_an_interrupted_download_is_a_one_line_error(cli, monkeypatch, toy, tmp_path: Path) -> None:
    serve(monkeypatch, FakeResponse(CONTENT[:500], then=http.client.IncompleteRead(b"", 1400)))
    code, _, err = cli("prepare", "toy", "--tokenizer", "char", "--out", tmp_path / "out", "-q")
    lines = err.splitlines()
    assert code == 1 and "Traceback" not in err
    assert (
        lines[-1].startswith("lmforge prepare: error: could not download 'toy'") and "IncompleteRead" in err
    )
    assert sum("error" in line for line in lines) == 1
    assert leftovers(toy) == []


def test_a_short_download_is_refused(monkeypatch, toy) -> None:
    serve(monkeypatch, FakeResponse(CONTENT[:-1]))
    with pytest.raises(
        LmforgeError, match=f"ended after {len(CONTENT) - 1:,} of the pinned {len(CONTENT):,} bytes"
    ):
        sources.open_corpus("toy")
    assert leftovers(toy) == []


def test_reading_stops_past_the_pinned_size(monkeypatch, toy) -> None:
    endless = FakeResponse(CONTENT * 1000)
    serve(monkeypatch, endless)
    with pytest.raises(LmforgeError, match=f"larger than the pinned {len(CONTENT):,} bytes"):
        sources.open_corpus("toy")
    assert endless.served <= len(CONTENT) + 4096  # stopped within one read of the pin
    assert leftovers(toy) == []


def test_a_download_past_its_deadline_is_abandoned(monkeypatch, toy) -> None:
    body = CONTENT * 1000
    big = sources.NamedDataset("toy", "toy.txt", toy.url, hashlib.sha256(body).hexdigest(), len(body))
    monkeypatch.setitem(sources.NAMED_DATASETS, "toy", (big,))
    monkeypatch.setenv("LMFORGE_DOWNLOAD_TIMEOUT", "0.2")
    serve(monkeypatch, FakeResponse(body, delay=0.05))  # 4 kB per 50 ms: 1.9 MB would take 23 s
    start = time.monotonic()
    with pytest.raises(LmforgeError, match=r"took longer than 0.2 s \(LMFORGE_DOWNLOAD_TIMEOUT\)"):
        sources.open_corpus("toy")
    assert time.monotonic() - start < 2
    assert leftovers(toy) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_a_bad_download_timeout_is_refused(monkeypatch, toy, value: str) -> None:
    monkeypatch.setenv("LMFORGE_DOWNLOAD_TIMEOUT", value)
    serve(monkeypatch, FakeResponse(CONTENT))
    with pytest.raises(LmforgeError, match="LMFORGE_DOWNLOAD_TIMEOUT must be a number of seconds > 0"):
        sources.open_corpus("toy")


def test_stale_partial_downloads_are_removed_and_fresh_ones_kept(monkeypatch, toy) -> None:
    folder = cached(toy).parent
    folder.mkdir(parents=True)
    stale, fresh = folder / ".toy.txt.abc123", folder / ".toy.txt.def456"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"another download in progress")
    old = time.time() - 2 * sources.DEFAULT_DOWNLOAD_TIMEOUT_S
    os.utime(stale, (old, old))
    serve(monkeypatch, FakeResponse(CONTENT))
    sources.open_corpus("toy")
    assert leftovers(toy) == [".toy.txt.def456", "toy.txt"]
