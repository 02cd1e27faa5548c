"""What training needs of its data, declared once: `TrainingData` and the `Batches` it draws.

`PreparedData` (token shards) and `SFTData` (fine-tuning JSONL) both satisfy these protocols
structurally, without inheriting from them, so a new kind of data only has to provide the
same members to be trained on. Both are `runtime_checkable`: `isinstance` checks that the
members exist (not their signatures; the tests and a type checker do that).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

# (x, y): int64 input ids and target ids of the same shape (batch, length); a target of
# IGNORE_INDEX does not count in the loss.
Batch = tuple[torch.Tensor, torch.Tensor]
# (x, y, documents): a batch of packed rows (data.pack), several examples per row; `documents` (batch,
# length) gives the index in its row of the example each position belongs to, -1 on padding.
PackedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@runtime_checkable
class Batches(Protocol):
    """An endless, seeded stream of training batches that a checkpoint can resume exactly."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to draw the same batches again (tensors and numbers only)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, as returned by `state_dict`, whatever the seed given at creation."""
        ...


@runtime_checkable
class TrainingData(Protocol):
    """A data folder opened for training: its tokenizer, train batches and held-out split."""

    @property
    def dir(self) -> Path:
        """The folder the data was read from."""
        ...

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer.json the ids come from; a run copies it beside its checkpoints."""
        ...

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id the data can hold."""
        ...

    def train_batches(self, block_size: int, batch_size: int, seed: int) -> Batches:
        """Batches of `batch_size` rows of at most `block_size` tokens, in an order fixed by `seed`."""
        ...

    def eval_batches(self, block_size: int, batch_size: int) -> Iterator[Batch]:
        """Every target of the held-out split once, in a fixed order."""
        ...

    def bytes_per_token(self, split: str = "val") -> float | None:
        """UTF-8 bytes per token of a split ("train" or the held-out "val"); None when unknown."""
        ...
