"""Packed fine-tuning (data.pack): several examples per row, each computed as it would be alone."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.sft import ExampleBatches, collate, collate_packed, pack_rows
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.model import GPT
from lmforge.targets import IGNORE_INDEX
from tests.data.test_sft import ALPHABET, tokenize_pairs


def examples(n: int, seed: int = 0) -> list:
    """n prompt/completion examples of varied lengths (6 to 42 tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (n, 2), generator=g).tolist()
    pairs = [(f"q{'a' * p}:", " " + "b" * c) for p, c in lengths]
    return tokenize_pairs(pairs, char_tokenizer(ALPHABET, specials=[EOT]), 64, Path("x"))


def test_rows_hold_every_example_once_and_never_overflow() -> None:
    sizes = [7, 3, 9, 1, 5, 8, 2, 2, 6, 4]
    rows = pack_rows(list(range(len(sizes))), sizes, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 47 positions: best fit needs the fewest rows of 10 here


def test_packed_batches_cover_every_example_each_epoch_and_resume_exactly() -> None:
    data = examples(60)
    batches = ExampleBatches(data, 4, seed=3, max_length=64, pack=True)
    assert sorted(batches.order.tolist()) == list(range(60))  # one epoch: each example once
    assert batches.rows < 60 / 2  # far fewer rows than examples
    resumed = ExampleBatches(data, 4, seed=99, max_length=64, pack=True)
    for _ in range(batches.rows // 4 + 2):  # into the second epoch
        next(batches)
    resumed.load_state_dict(batches.state_dict())
    for _ in range(6):
        assert all(torch.equal(a, b) for a, b in zip(next(batches), next(resumed)))
    assert batches.epoch >= 1


def test_a_packed_row_keeps_each_examples_targets_and_marks_its_documents() -> None:
    first, second = examples(2)
    x, y, documents = collate_packed([[first, second]], max_length=64)
    n1, n2 = len(first.ids) - 1, len(second.ids) - 1
    alone = [collate([e]) for e in (first, second)]
    assert torch.equal(x[0, :n1], alone[0][0][0, :n1]) and torch.equal(
        y[0, n1 : n1 + n2], alone[1][1][0, :n2]
    )
    assert documents[0].tolist() == [0] * n1 + [1] * n2 + [-1] * (x.size(1) - n1 - n2)
    assert (y[0, n1 + n2 :] == IGNORE_INDEX).all()


def per_example_losses(
    logits: torch.Tensor, y: torch.Tensor, spans: list[list[tuple[int, int]]]
) -> list[float]:
    """The summed cross-entropy of each example, given its (start, end) positions in each row."""
    losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return [losses[r, start:end].sum().item() for r, row in enumerate(spans) for start, end in row]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_examples_have_the_losses_and_gradients_they_have_alone(position: str) -> None:
    """fp32 throughout (no autocast): packed and unpacked differ only by float summation order."""
    data = examples(12, seed=1)
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=64, vocab_size=40, position=position)
    model = GPT(config)
    rows = pack_rows(list(range(len(data))), [len(e.ids) - 1 for e in data], 64)
    assert len(rows) < len(data) / 2 and all(len(row) > 1 for row in rows[:-1])
    x, y, documents = collate_packed([[data[i] for i in row] for row in rows], max_length=64)
    spans, order = [], []
    for row in rows:
        starts = torch.tensor([0] + [len(data[i].ids) - 1 for i in row]).cumsum(0).tolist()
        spans.append(list(zip(starts, starts[1:])))
        order += row
    logits, packed_loss = model(x, y, documents=documents)
    packed = per_example_losses(logits, y, spans)
    packed_loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ux, uy = collate([data[i] for i in order], max_length=64)
    logits, unpacked_loss = model(ux, uy)
    unpacked = per_example_losses(logits, uy, [[(0, len(data[i].ids) - 1)] for i in order])
    unpacked_loss.backward()
    assert packed == pytest.approx(unpacked, rel=1e-5, abs=1e-5)
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-6)  # the same targets' mean
    for a, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    # without the documents the examples would see each other: the losses differ
    crossed = per_example_losses(model(x, y)[0], y, spans)
    assert crossed != pytest.approx(unpacked, rel=1e-3)
