import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data import PreparedData, RandomWindows, eval_windows, prepare
from lmforge.errors import LmforgeError


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    (tmp_path / "in.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
    prepare(str(tmp_path / "in.txt"), tmp_path / "data", tokenizer="char", progress=False)
    return tmp_path / "data"


def test_open_reads_meta_and_memmaps(prepared: Path) -> None:
    data = PreparedData.open(prepared)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert len(data.train) == data.meta["train_tokens"] and len(data.val) == data.meta["val_tokens"]
    assert data.vocab_size == data.meta["vocab_size"]
    assert data.bytes_per_token("val") == 1.0  # ASCII, one char per token
    assert data.tokenizer().decode(data.val[:10].tolist()) == data.tokenizer().decode(data.val.tolist())[:10]


def test_random_windows_targets_are_inputs_shifted(prepared: Path) -> None:
    data = PreparedData.open(prepared)
    x, y = next(RandomWindows(data.train, block_size=16, batch_size=4, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(data.train.astype(np.int64))
    for row in x:  # each row is a real window of the train split
        starts = [s for s in range(len(train) - 16) if torch.equal(train[s : s + 16], row)]
        assert starts


def test_random_windows_are_seeded_and_resume_exactly(prepared: Path) -> None:
    data = PreparedData.open(prepared)
    a = RandomWindows(data.train, 8, 3, seed=5)
    b = RandomWindows(data.train, 8, 3, seed=5)
    c = RandomWindows(data.train, 8, 3, seed=6)
    first = [next(a) for _ in range(3)]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, [next(b) for _ in range(3)]))
    assert not torch.equal(first[0][0], next(c)[0])
    # Save the state mid-stream through torch.save / torch.load(weights_only=True).
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = [next(a) for _ in range(5)]
    buffer.seek(0)
    resumed = RandomWindows(data.train, 8, 3, seed=999)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.batches_drawn == 3
    for (x1, y1), (x2, y2) in zip(expected, [next(resumed) for _ in range(5)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize(("block_size", "batch_size"), [(16, 4), (7, 3), (1000, 2)])
def test_eval_windows_score_every_token_once(prepared: Path, block_size: int, batch_size: int) -> None:
    val = PreparedData.open(prepared).val
    inputs, targets = [], []
    for x, y in eval_windows(val, block_size, batch_size):
        assert x.shape == y.shape and x.shape[1] <= block_size and x.shape[0] <= batch_size
        assert torch.equal(x[:, 1:], y[:, :-1])
        inputs.append(x.flatten())
        targets.append(y.flatten())
    np.testing.assert_array_equal(torch.cat(targets).numpy(), val[1:])
    np.testing.assert_array_equal(torch.cat(inputs).numpy(), val[:-1])


def test_block_size_larger_than_split_is_an_error(prepared: Path) -> None:
    data = PreparedData.open(prepared)
    with pytest.raises(LmforgeError, match="block_size 100000 needs more than 100000 tokens"):
        RandomWindows(data.val, 100_000, 1, seed=0)


def test_open_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="not a prepared data folder"):
        PreparedData.open(tmp_path / "nothing")
    with open(prepared / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(LmforgeError, match="val.bin: .* bytes, meta.json val_tokens implies"):
        PreparedData.open(prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    del meta["vocab_size"]
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LmforgeError, match="missing key"):
        PreparedData.open(prepared)
    (prepared / "meta.json").write_text("{broken")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        PreparedData.open(prepared)


@pytest.mark.parametrize("split", ["train", "val"])
def test_open_refuses_token_ids_outside_the_vocabulary(prepared: Path, split: str) -> None:
    vocab = json.loads((prepared / "meta.json").read_text())["vocab_size"]
    tokens = np.fromfile(prepared / f"{split}.bin", dtype=np.uint16)
    tokens[7] = vocab  # one past the largest id the model's embedding has
    tokens.tofile(prepared / f"{split}.bin")
    with pytest.raises(LmforgeError, match=f"{split}.bin: token id {vocab} at position 7 is outside"):
        PreparedData.open(prepared)


def test_checking_the_ids_of_tinyshakespeare_takes_milliseconds(shared_data: Path, tmp_path: Path) -> None:
    import time

    prepare(
        str(shared_data / "tinyshakespeare" / "input.txt"), tmp_path / "d", tokenizer="char", progress=False
    )
    PreparedData.open(tmp_path / "d")  # warm the page cache
    start = time.perf_counter()
    PreparedData.open(tmp_path / "d")
    assert time.perf_counter() - start < 0.1
