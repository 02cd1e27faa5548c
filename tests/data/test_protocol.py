"""Both kinds of training data satisfy the declared `TrainingData` protocol, member by member."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from lmforge.data import Batches, PreparedData, TrainingData, prepare
from lmforge.data.sft import SFTData
from lmforge.data.tokenizer import EOT, char_tokenizer

BLOCK_SIZE, BATCH_SIZE = 16, 4


def _prepared(root: Path) -> PreparedData:
    (root / "in.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
    prepare(str(root / "in.txt"), root / "data", tokenizer="char", progress=False)
    return PreparedData.open(root / "data")


def _sft(root: Path) -> SFTData:
    folder = root / "sft"
    folder.mkdir()
    records = [{"prompt": f"q{i}: say {i}\na:", "completion": f" {i} said"} for i in range(12)]
    for name in ("train.jsonl", "val.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer_file = root / "tokenizer.json"
    char_tokenizer("0123456789qsaiyd: \n", specials=[EOT]).save(str(tokenizer_file))
    return SFTData(folder, tokenizer_file, BLOCK_SIZE)


@pytest.fixture(params=["tokens", "sft"])
def data(request: pytest.FixtureRequest, tmp_path: Path) -> TrainingData:
    return _prepared(tmp_path) if request.param == "tokens" else _sft(tmp_path)


def test_both_kinds_of_data_are_training_data(data: TrainingData) -> None:
    assert isinstance(data, TrainingData)
    assert isinstance(data.dir, Path) and data.tokenizer_file.is_file()
    assert isinstance(data.vocab_size, int) and data.vocab_size > 0


@pytest.mark.parametrize("method", ["train_batches", "eval_batches", "bytes_per_token"])
def test_methods_take_the_protocols_parameters_and_defaults(data: TrainingData, method: str) -> None:
    declared = inspect.signature(getattr(TrainingData, method)).parameters
    actual = inspect.signature(getattr(type(data), method)).parameters
    assert [(p.name, p.kind, p.default, p.annotation) for p in actual.values()] == [
        (p.name, p.kind, p.default, p.annotation) for p in declared.values()
    ]


def test_train_batches_are_resumable_int64_pairs(data: TrainingData) -> None:
    batches = data.train_batches(BLOCK_SIZE, BATCH_SIZE, seed=0)
    assert isinstance(batches, Batches)
    x, y = next(batches)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.size(0) == BATCH_SIZE
    state = batches.state_dict()
    expected = next(batches)
    resumed = data.train_batches(BLOCK_SIZE, BATCH_SIZE, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected))


def test_eval_batches_are_int64_pairs_and_bytes_per_token_is_a_number_or_none(data: TrainingData) -> None:
    batches = list(data.eval_batches(BLOCK_SIZE, BATCH_SIZE))
    assert batches and all(x.dtype == y.dtype == torch.int64 and x.shape == y.shape for x, y in batches)
    assert data.bytes_per_token("val") is None or data.bytes_per_token("val") > 0
    assert data.bytes_per_token() == data.bytes_per_token("val")


def test_an_object_without_the_members_is_not_training_data() -> None:
    assert not isinstance(object(), TrainingData)
    assert not isinstance(iter([]), Batches)  # an iterator that cannot be checkpointed
