"""The loss of a model over a split (`evaluate_lm`)."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.inference.loss import evaluate_lm
from lmforge.model.gpt import GPT
from lmforge.model.heads import span_loss
from lmforge.targets import IGNORE_INDEX, SPAN_END, SPAN_OTHER, SPAN_START


def test_a_bidirectional_span_model_is_scored_without_seeing_its_padding() -> None:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=16, vocab_size=50, head="span",
                         attention="bidirectional")  # fmt: skip
    model = GPT(config)
    x, y = torch.randint(0, 50, (2, 12)), torch.full((2, 12), SPAN_OTHER)
    y[:, 3], y[:, 5] = SPAN_START, SPAN_END
    y[1, 7:] = IGNORE_INDEX  # the second row is 7 tokens and padding
    with torch.no_grad():
        alone = [span_loss(model(x[r : r + 1, :n])[0], y[r : r + 1, :n]).item() for r, n in ((0, 12), (1, 7))]
    scored = evaluate_lm(model, [(x, y)], torch.device("cpu"))
    assert scored.tokens == 2 and scored.loss == pytest.approx(sum(alone) / 2, abs=1e-5)
