"""Output heads (`lmforge.model.heads`): GPT's body makes a residual stream, the head named by model.head
reads it through the final norm into logits and a loss, with its own rules for the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import GPT
from lmforge.model.heads import HEADS, Head, HeadOutput, LMHead, SpanHead, head_rows, span_loss
from lmforge.targets import IGNORE_INDEX, SPAN_END, SPAN_OTHER, SPAN_START


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, block_size=16, vocab_size=50)
    return ModelConfig(**(base | overrides))


def span_targets() -> torch.Tensor:
    """Two rows of 8: an answer at 2..4, and one at 5 in a row of 6 tokens and padding."""
    y = torch.full((2, 8), SPAN_OTHER)
    y[0, 2], y[0, 4] = SPAN_START, SPAN_END
    y[1, 5] = SPAN_START | SPAN_END
    y[1, 6:] = IGNORE_INDEX  # padding: never a candidate
    return y


def test_model_head_names_the_head_that_forward_outputs_through() -> None:
    assert HEADS == {"lm": LMHead, "span": SpanHead}
    for name, head in HEADS.items():
        model = GPT(tiny(head=name))
        assert type(model.output_head) is head and isinstance(model.output_head, Head)
    assert isinstance(GPT(tiny(head="span")).head, LMHead)  # a task model keeps its base's LM head


def test_each_head_reports_whether_its_loss_is_a_mean_per_row() -> None:
    assert not LMHead.per_row_loss  # a mean over target tokens: a long answer weighs more
    assert SpanHead.per_row_loss  # a mean over examples


@pytest.mark.parametrize("name", ["lm", "span"])
def test_forward_is_the_body_then_the_head(name: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(head=name, attention="bidirectional" if name == "span" else "causal"))
    x = torch.randint(0, 50, (2, 8))
    y = span_targets() if name == "span" else torch.randint(0, 50, (2, 8))
    stream = model.residual_stream(x, y)  # (B, T, d_model)
    expected = model.output_head.output(stream, y, norm=model.norm)
    out = model(x, y)
    assert isinstance(out, HeadOutput)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)


class ConstantHead(Head, torch.nn.Linear):
    """A head for the test only: one score per position, its loss the mean score of every row."""

    per_row_loss = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.d_model, 1)

    def output(self, x, targets=None, *, norm, only_targets=False) -> HeadOutput:
        scores = self(norm(x))  # (B, T, 1)
        return HeadOutput(scores, None if targets is None else scores.mean())


def test_a_new_head_plugs_in_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(HEADS, "constant", ConstantHead)
    torch.manual_seed(0)
    model = GPT(tiny(head="constant"))
    assert model.output_head is model.constant_head  # held as `<name>_head`: its checkpoint keys
    assert {"constant_head.weight", "constant_head.bias"} <= model.state_dict().keys()
    scores, loss = model(torch.randint(0, 50, (2, 8)), torch.zeros(2, 8, dtype=torch.long))
    assert scores.shape == (2, 8, 1) and loss == scores.mean()


def test_checkpoints_keep_their_keys() -> None:
    model = GPT(tiny(head="span", word_match=True, n_layer=1))
    outside_blocks = {k for k in model.state_dict() if not k.startswith("blocks.")}
    assert outside_blocks == {
        "embed.weight", "pos_embed.weight", "norm.weight", "norm.bias", "head.weight",
        "span_head.weight", "span_head.bias", "match_embed.weight",
    }  # fmt: skip


def test_a_head_is_its_plain_layer_to_hooks_and_the_logit_lens() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(logit_softcap=5.0))
    hidden = torch.randn(2, 8, 32)
    assert isinstance(model.head, torch.nn.Linear)
    torch.testing.assert_close(model.head(hidden), F.linear(hidden, model.embed.weight))  # no soft-cap
    capped = model.head.logits(hidden)
    assert capped.abs().max() < 5.0
    torch.testing.assert_close(model.output_head.output(hidden, norm=torch.nn.Identity()).logits, capped)


def test_only_targets_reads_just_the_kept_rows_through_the_norm() -> None:
    seen = []
    norm = torch.nn.LayerNorm(32)
    norm.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    head = LMHead(tiny())
    y = torch.full((2, 8), IGNORE_INDEX)
    y[:, 6:] = 1  # 4 targets that count
    logits, _ = head.output(torch.randn(2, 8, 32), y, norm=norm, only_targets=True)
    assert logits.shape == (4, 50) and seen == [(128, 32)]  # 4 rows, padded to ROW_MULTIPLE


@pytest.mark.parametrize("name", ["lm", "span"])
def test_a_heads_summed_loss_over_its_count_is_its_mean_loss(name: str) -> None:
    torch.manual_seed(0)
    head = HEADS[name](tiny())
    hidden = torch.randn(2, 8, 32)
    y = span_targets() if name == "span" else torch.randint(0, 50, (2, 8))
    if name == "lm":
        y[1, 5:] = IGNORE_INDEX
    logits, loss = head.output(hidden, y, norm=torch.nn.LayerNorm(32))
    summed, count = head.summed_loss(logits, y)
    assert count == (2 if name == "span" else 13)  # rows, or target tokens
    torch.testing.assert_close(summed / count, loss)


def test_span_loss_is_the_mean_of_start_and_end_cross_entropy_over_the_prompt() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(head="span"))
    x, y = torch.randint(0, 50, (2, 8)), span_targets()
    scores, loss = model(x, y)
    assert scores.shape == (2, 8, 2)
    expected = 0.0
    for row, (start, end, n) in enumerate([(2, 4, 8), (5, 5, 6)]):
        log_probs = torch.log_softmax(scores[row, :n], dim=0)  # over the row's positions
        expected -= (log_probs[start, 0] + log_probs[end, 1]) / 2
    assert torch.allclose(loss, expected / 2)
    assert torch.allclose(span_loss(scores, y), loss)
    x[1, 6:] = 7  # what padding holds does not matter
    assert torch.allclose(model(x, y)[1], loss)


def test_head_rows_of_a_data_parallel_batch_pad_each_ranks_share() -> None:
    targets = torch.full((4, 40), IGNORE_INDEX)
    targets[:, 30:] = 1  # 10 scored targets per row
    assert head_rows(targets) == 128  # one rank: 40 rows padded to 128
    assert head_rows(targets, parts=2) == 256  # two ranks of 20 rows, each padded to 128
    assert head_rows(targets, parts=4) == 512
