"""Read prepared token shards: random training windows and the full validation split."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.data.protocol import Batch
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.jsonl import loads

REQUIRED_META_KEYS = ("vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer")
ID_CHECK_CHUNK = 1 << 24  # ids per step of the vocabulary check: 32-64 MB of a shard at a time


@dataclass(frozen=True)
class PreparedData:
    """A folder written by `lmforge prepare`, its shards opened as read-only memmaps.

    Satisfies `TrainingData` (lmforge.data.protocol): training takes it or `SFTData` alike.
    """

    dir: Path
    meta: dict
    train: np.memmap
    val: np.memmap

    @classmethod
    def open(cls, directory: Path | str) -> PreparedData:
        """Open a prepared folder, checking meta.json against the shards' sizes."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise LmforgeError(
                f"{directory}: not a prepared data folder (no meta.json; run `lmforge prepare`)"
            )
        try:
            meta = loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LmforgeError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise LmforgeError(f"{meta_path}: expected a JSON object")
        missing = [key for key in REQUIRED_META_KEYS if key not in meta]
        if missing:
            raise LmforgeError(f"{meta_path}: missing key(s) {', '.join(missing)}")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise LmforgeError(f"{meta_path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
        vocab = meta["vocab_size"]
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
            raise LmforgeError(f"{meta_path}: vocab_size must be a positive integer, got {vocab!r}")
        shards = {
            name: _open_shard(directory / f"{name}.bin", meta, f"{name}_tokens") for name in ("train", "val")
        }
        for name, tokens in shards.items():
            _check_ids(tokens, vocab, directory / f"{name}.bin")
        return cls(dir=directory, meta=meta, train=shards["train"], val=shards["val"])

    @property
    def vocab_size(self) -> int:
        """meta.json's vocab_size: one more than the largest id the shards can hold."""
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were encoded with."""
        return load_tokenizer(self.dir / "tokenizer.json")

    def train_batches(self, block_size: int, batch_size: int, seed: int) -> RandomWindows:
        """Random windows of the train split, endlessly, in an order fixed by `seed`."""
        return RandomWindows(self.train, block_size, batch_size, seed=seed)

    def check_evaluable(self) -> None:
        """A val split of one token has no target to score: an error naming the folder."""
        if len(self.val) < 2:
            raise LmforgeError(f"{self.dir}: the val split needs at least 2 tokens to evaluate")

    def eval_batches(self, block_size: int, batch_size: int) -> Iterator[Batch]:
        """The val split in non-overlapping windows, every token once as a target."""
        self.check_evaluable()
        return eval_windows(self.val, block_size, batch_size)

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer.json `lmforge prepare` wrote beside the shards."""
        return self.dir / "tokenizer.json"

    def bytes_per_token(self, split: str = "val") -> float | None:
        """UTF-8 bytes per token of a split, for bits-per-byte; None when unknown."""
        text_bytes = self.meta.get(f"{split}_bytes")
        tokens = self.meta[f"{split}_tokens"]
        return text_bytes / tokens if text_bytes and tokens else None


def _open_shard(path: Path, meta: dict, count_key: str) -> np.memmap:
    dtype = np.dtype(meta["dtype"])
    if not path.is_file():
        raise LmforgeError(f"{path}: missing token shard")
    expected = int(meta[count_key]) * dtype.itemsize
    if path.stat().st_size != expected:
        raise LmforgeError(f"{path}: {path.stat().st_size} bytes, meta.json {count_key} implies {expected}")
    if expected == 0:
        raise LmforgeError(f"{path}: empty token shard")
    return np.memmap(path, dtype=dtype, mode="r")


def _check_ids(tokens: np.ndarray, vocab_size: int, path: Path) -> None:
    """Refuse an id the model's embedding has no row for, which would index out of bounds in training.

    A streaming max in chunks keeps memory flat; numpy reads memory-mapped ids at several GB/s, so
    TinyShakespeare's 2 MB shard takes about a millisecond.
    """
    for start in range(0, len(tokens), ID_CHECK_CHUNK):
        chunk = tokens[start : start + ID_CHECK_CHUNK]
        if int(chunk.max()) >= vocab_size:
            position = start + int(np.argmax(chunk >= vocab_size))
            raise LmforgeError(
                f"{path}: token id {int(tokens[position])} at position {position} is outside the vocabulary "
                f"(meta.json vocab_size {vocab_size}); the shard does not match its meta.json"
            )


class SeededBatches:
    """A batch sampler driven by one seeded `torch.Generator`: its state (a uint8 tensor) and the
    batch count go into a checkpoint unchanged, so a resumed run draws exactly the same batches."""

    generator: torch.Generator
    batches_drawn: int

    def __iter__(self) -> Iterator[Batch]:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The generator's state and the batch count: enough to resume exactly."""
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


class RandomWindows(SeededBatches):
    """Seeded, resumable sampler of (input, target) batches of `block_size` windows.

    Offsets come from a `torch.Generator`, whose state (a uint8 tensor) goes into a
    checkpoint unchanged, so a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, *, seed: int) -> None:
        if len(tokens) <= block_size:
            raise LmforgeError(
                f"block_size {block_size} needs more than {block_size} tokens, the split has {len(tokens)}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._window = np.arange(block_size + 1)

    def __next__(self) -> Batch:
        offsets = torch.randint(
            len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator
        )
        rows = torch.from_numpy(self.tokens[offsets.numpy()[:, None] + self._window].astype(np.int64))
        self.batches_drawn += 1
        return rows[:, :-1], rows[:, 1:]


class PoissonWindows(SeededBatches):
    """Poisson-sampled batches of disjoint windows, for differentially private training.

    The train split is cut into `windows` = len(tokens) // (block_size + 1) disjoint windows of
    block_size + 1 tokens (the last partial one is never used); each batch includes every window
    independently with probability `sample_rate` = batch_size / windows, so its size varies around
    `batch_size` (and may be 0). That is the sampling DP-SGD's privacy accounting assumes. It is drawn
    as a Binomial(windows, sample_rate) count, then that many distinct windows uniformly (which is the
    same distribution), so a step costs the batch, not the corpus. Resumable like `RandomWindows`.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, *, seed: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.windows = len(tokens) // (block_size + 1)
        if batch_size > self.windows:
            raise LmforgeError(
                f"train.batch_size {batch_size} is larger than the {self.windows} disjoint windows of "
                f"{block_size + 1} tokens in the train split (privacy samples each at most once per batch)"
            )
        self.sample_rate = batch_size / self.windows
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._window = np.arange(block_size + 1)

    def __next__(self) -> Batch:
        total, rate = torch.tensor(float(self.windows)), torch.tensor(self.sample_rate)
        count = int(torch.binomial(total, rate, generator=self.generator))
        chosen = torch.empty(0, dtype=torch.long)
        while len(chosen) < count:  # distinct windows: redraw the duplicates (rare while count << windows)
            extra = torch.randint(self.windows, (count - len(chosen),), generator=self.generator)
            chosen = torch.unique(torch.cat([chosen, extra]))
        starts = chosen.numpy()[:, None] * (self.block_size + 1)  # (count, 1)
        rows = torch.from_numpy(
            self.tokens[starts + self._window].astype(np.int64)
        )  # (count, block_size + 1)
        self.batches_drawn += 1
        return rows[:, :-1], rows[:, 1:]


def eval_windows(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[Batch]:
    """Every token of a split exactly once as a target, in non-overlapping windows.

    Full `block_size` windows come in batches of `batch_size`; the leftover tail, if any,
    comes last as one shorter window, so no token is left out.
    """
    n_targets = len(tokens) - 1
    full = n_targets // block_size
    for start in range(0, full, batch_size):
        count = min(batch_size, full - start)
        begin, end = start * block_size, (start + count) * block_size
        rows = torch.from_numpy(np.asarray(tokens[begin : end + 1], dtype=np.int64))
        yield rows[:-1].view(count, block_size), rows[1:].view(count, block_size)
    tail = n_targets - full * block_size
    if tail:
        rows = torch.from_numpy(np.asarray(tokens[full * block_size :], dtype=np.int64))
        yield rows[:-1].unsqueeze(0), rows[1:].unsqueeze(0)
