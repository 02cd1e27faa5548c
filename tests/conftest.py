"""Shared fixtures: the shared data folder, an offline cache, and a CLI runner."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data import prepare
from tests.fixtures.pinned import fixture_pins

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
# Small copies of the shared datasets in their formats (tests/fixtures/make_data.py writes them): the
# suite runs on them where the shared folder is missing, so a clone alone tests everything.
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"

# lmforge's compiled CPU kernels are built once for the whole run and its subprocesses, not once
# per test: each test has its own LMFORGE_CACHE_DIR (below), where they would otherwise be kept
os.environ.setdefault("LMFORGE_KERNEL_CACHE_DIR", str(REPO / ".pytest_cache" / "lmforge-kernels"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N runs N workers, one per core: each computes with one thread (its subprocesses
    # too), or the workers' thread pools would fight over the cores and stall every small op.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@dataclass(frozen=True)
class Datasets:
    """Where the tests' datasets are: the shared folder, or the repository's small copies."""

    root: Path
    real: bool  # the shared datasets themselves: tests check their published sizes too


def find_datasets() -> Datasets:
    shared = Path(os.environ.get("LMFORGE_DATA_DIR", DEFAULT_DATA_DIR))
    if (shared / "tinyshakespeare" / "input.txt").is_file():
        return Datasets(shared, real=True)
    return Datasets(FIXTURE_DATA, real=False)


DATASETS = find_datasets()
cached_fixture_pins = functools.cache(fixture_pins)  # hashing the copies once per process


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the network and never share a dataset cache; named datasets come from the
    shared folder, or else from the small copies, pinned to their own hashes."""
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(DATASETS.root))
    if not DATASETS.real:
        from lmforge.data import sources

        for registry, pins in cached_fixture_pins().items():
            for name, parts in pins.items():
                monkeypatch.setitem(getattr(sources, registry), name, parts)


@pytest.fixture
def shared_data() -> Path:
    """The datasets folder: the shared one ($LMFORGE_DATA_DIR, else ../shared/data), else the small
    copies. CI has the shared folder: there (CI=true) its absence fails the test, never skips it."""
    if not DATASETS.real and os.environ.get("CI") == "true":
        pytest.fail(
            f"shared data not found at {os.environ.get('LMFORGE_DATA_DIR', DEFAULT_DATA_DIR)} (CI=true)"
        )
    return DATASETS.root


CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    # without these, Chromium opens connections the closed network refuses, many at a time
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium driven by Playwright (Debian's /usr/bin/chromium, or $LMFORGE_CHROMIUM).

    Skipped where no Chromium is installed, except under `.ci/run`, which installs it and sets
    LMFORGE_REQUIRE_BROWSER=1 so that a missing browser fails instead of passing silently."""
    executable = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        if os.environ.get("LMFORGE_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium not found: install Debian's chromium (apt-get install chromium)")
        pytest.skip("Chromium not found; browser tests need Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh browser page (its own context: no cookies or storage shared between tests)."""
    context = browser.new_context(viewport={"width": 1100, "height": 800}, accept_downloads=True)
    yield context.new_page()
    context.close()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `lmforge ARGS...` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def random_char_run(
    run: Path, alphabet: str, *, n_layer: int, d_model: int, block_size: int, seed: int = 0
) -> Path:
    """A randomly initialised character model with <|endoftext|> saved as run folder `run` (its
    tokenizer beside it): enough for tests of generation front ends, which never need sense."""
    from lmforge import checkpoint
    from lmforge.config import Config, ModelConfig
    from lmforge.data.tokenizer import EOT, char_tokenizer
    from lmforge.model import GPT

    tokenizer = char_tokenizer(alphabet, specials=[EOT])
    tokenizer_file = run.parent / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    m = ModelConfig(
        n_layer=n_layer,
        n_head=2,
        d_model=d_model,
        block_size=block_size,
        vocab_size=tokenizer.get_vocab_size(),
    )
    torch.manual_seed(seed)
    checkpoint.save_checkpoint(
        run, 1, GPT(m), state={}, config=Config(model=m), tokenizer_file=tokenizer_file, val_loss=None
    )
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Tests that compare two computations to 1e-5 or bit for bit pin fp32: under train.dtype = "auto" a
# machine with native bf16 (or LMFORGE_NATIVE_BF16=1) computes in bf16, whose 8-bit mantissa
# rounds two reduction orders apart by ~1e-4. The bf16 path has its own tests (marker `bf16`).
PIN_FP32 = "train.dtype=fp32"
# bf16's unit roundoff: two bf16 computations of one value may differ by this much relatively.
BF16_EPS = 2.0**-8

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.block_size=32",
    "train.batch_size=8",
    "train.max_steps=40",
    "train.eval_interval=10",
    "train.checkpoint_interval=10",
    "train.eval_batch_size=64",
    "schedule.warmup_steps=5",
    "optim.lr=3e-3",
    "schedule.min_lr=3e-4",
    "train.device=cpu",
    "log.progress=false",
]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 kB of TinyShakespeare, char-level (the same text in the shared and the small copy)."""
    source = DATASETS.root / "tinyshakespeare" / "input.txt"
    root = tmp_path_factory.mktemp("chardata")
    (root / "text.txt").write_text(source.read_text()[:60_000])
    prepare(str(root / "text.txt"), root / "data", tokenizer="char", progress=False)
    return root / "data"


GUTENBERG_BOOKS = {
    "train": [
        "THE FIRST BOOK\n\nIt was a dark and stormy night; the rain fell in torrents.\n" * 20,
        "CHAPTER I\n\nCall me Ishmael. Some years ago, never mind how long precisely.\n" * 20,
        "A tale of two cities: it was the best of times, it was the worst of times.\n" * 20,
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home.\n" * 20,
    ],
    "val": ["It is a truth universally acknowledged, that a single man in possession\n" * 20],
}


def write_gutenberg(root: Path, books: dict[str, list[str]]) -> dict[str, Path]:
    """A corpus in the shared gutenberg format (one gzip per split, `<|endoftext|>` line after each book)."""
    import gzip

    (root / "gutenberg").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, filename in (("train", "train.txt.gz"), ("val", "valid.txt.gz")):
        text = "".join(book.strip() + "\n<|endoftext|>\n" for book in books[split])
        paths[split] = root / "gutenberg" / filename
        paths[split].write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return paths


@pytest.fixture
def tiny_gutenberg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[str]]:
    """`gutenberg` as a 5-book copy in $LMFORGE_DATA_DIR, pinned to the copy's hashes; returns the books."""
    return use_gutenberg(monkeypatch, tmp_path / "shared", GUTENBERG_BOOKS)


def use_gutenberg(
    monkeypatch: pytest.MonkeyPatch, root: Path, books: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Make `books` the `gutenberg` dataset: written under `root` ($LMFORGE_DATA_DIR), hashes pinned."""

    from lmforge.data import sources

    paths = write_gutenberg(root, books)
    pinned = tuple(
        replace(part, sha256=sources.file_sha256(paths[part.split]), size=paths[part.split].stat().st_size)
        for part in sources.NAMED_DATASETS["gutenberg"]
    )
    monkeypatch.setitem(sources.NAMED_DATASETS, "gutenberg", pinned)
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(root))
    return books
