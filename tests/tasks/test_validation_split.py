"""val.jsonl: carved from train (seeded), never from the scored split."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.tasks import carve_validation


def test_carving_is_seeded_and_takes_the_fraction_out_of_train() -> None:
    examples = [{"prompt": f"q{i}", "completion": " a"} for i in range(100)]
    train, val = carve_validation(examples, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val, key=examples.index) == examples  # a partition, file order kept
    assert carve_validation(examples, 0.1, seed=3) == (train, val)
    assert carve_validation(examples, 0.1, seed=4)[1] != val


def test_carving_by_group_keeps_each_group_on_one_side() -> None:
    examples = [{"title": f"t{i // 5}", "n": i} for i in range(50)]  # 10 groups of 5
    train, val = carve_validation(examples, 0.2, seed=0, group="title")
    assert len(val) == 10 and not {e["title"] for e in train} & {e["title"] for e in val}


def test_carving_needs_two_examples() -> None:
    with pytest.raises(LmforgeError, match="too few to hold out val"):
        carve_validation([{"prompt": "a"}], 0.5, seed=0)
