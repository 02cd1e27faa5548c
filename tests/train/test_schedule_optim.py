import math

import pytest
import torch

from lmforge.config import ModelConfig, OptimConfig, ScheduleConfig
from lmforge.model import GPT
from lmforge.train.optim import build_optimizers, set_lr_factor, split_parameters
from lmforge.train.schedule import lr_factor


def factors(name: str, **kw) -> list[float]:
    config = ScheduleConfig(name=name, warmup_steps=10, min_lr=1e-4, **kw)
    return [lr_factor(step, config, max_steps=100, peak_lr=1e-3) for step in range(120)]


def test_warmup_is_nanogpt_linear() -> None:
    f = factors("cosine")
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[10] == pytest.approx(1.0)


def test_cosine_reaches_min_lr_and_stays() -> None:
    f = factors("cosine")
    assert f[55] == pytest.approx(0.1 + 0.5 * 0.9)  # half-way through the decay
    assert f[100] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_linear_constant_and_wsd() -> None:
    assert factors("linear")[55] == pytest.approx(1 - 0.5 * 0.9)
    assert factors("constant")[10:] == [1.0] * 110
    wsd = factors("wsd", wsd_decay_fraction=0.2)
    assert wsd[10:80] == [1.0] * 70  # stable until the last 20% of the steps
    assert wsd[90] == pytest.approx(1 - 0.5 * 0.9) and wsd[100] == pytest.approx(0.1)


def test_decay_steps_shortens_the_decay() -> None:
    f = factors("cosine", decay_steps=50)
    assert f[50] == pytest.approx(0.1) and f[80] == pytest.approx(0.1)


def model() -> GPT:
    return GPT(
        ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=8, vocab_size=20, tie_embeddings=False)
    )


def test_weight_decay_groups() -> None:
    net = model()
    parts = split_parameters(net)
    assert {id(p) for p in parts["embeddings"]} == {
        id(net.embed.weight),
        id(net.pos_embed.weight),
        id(net.head.weight),
    }
    assert all(p.dim() == 2 for p in parts["matrices"]) and all(p.dim() == 1 for p in parts["vectors"])
    assert sum(p.numel() for ps in parts.values() for p in ps) == net.num_params()
    (adamw,) = build_optimizers(net, OptimConfig(weight_decay=0.1))
    decays = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert decays[id(net.blocks[0].attn.qkv.weight)] == 0.1
    assert decays[id(net.embed.weight)] == 0.0 and decays[id(net.blocks[0].norm1.weight)] == 0.0
    (adamw,) = build_optimizers(net, OptimConfig(weight_decay=0.1, decay_embeddings=True))
    assert {g["weight_decay"] for g in adamw.param_groups for p in g["params"] if p is net.embed.weight} == {
        0.1
    }


def test_muon_takes_hidden_matrices_and_adamw_the_rest() -> None:
    net = model()
    muon, adamw = build_optimizers(net, OptimConfig(name="muon", muon_lr=0.02, lr=3e-3))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in split_parameters(net)["matrices"]}
    assert id(net.embed.weight) not in muon_ids
    set_lr_factor([muon, adamw], 0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01) and adamw.param_groups[0]["lr"] == pytest.approx(
        1.5e-3
    )


@pytest.mark.parametrize("name", ["adamw", "sgd", "muon"])
def test_each_optimizer_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    net = model()
    lr = {"adamw": 1e-2, "sgd": 0.5, "muon": 1e-2}[name]
    optimizers = build_optimizers(net, OptimConfig(name=name, lr=lr, muon_lr=0.05))
    idx = torch.randint(0, 20, (8, 9))
    losses = []
    for _ in range(25):
        _, loss = net(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert math.isfinite(losses[-1])


def muon_steps(optimizer_class: type, **options) -> list[torch.Tensor]:
    """Three steps on matrices of repeated, tall and wide shapes, from fixed gradients."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(shape)) for shape in [(48, 16), (16, 16), (16, 48), (16, 16), (48, 16)]
    ]
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, **options)
    for _ in range(3):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.bf16
@pytest.mark.parametrize("options", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"}])
def test_muon_in_bf16_updates_exactly_as_the_stock_optimizer(options: dict) -> None:
    from lmforge.train.optim import Muon

    ours = muon_steps(Muon, ns_dtype=torch.bfloat16, **options)
    stock = muon_steps(torch.optim.Muon, **options)
    for a, b in zip(ours, stock, strict=True):
        assert torch.equal(a, b)
    # fp32 iterations: the same update up to bf16's rounding
    for a, b in zip(muon_steps(Muon, ns_dtype=torch.float32, **options), stock, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


@pytest.mark.bf16
@pytest.mark.parametrize(("native", "ns_dtype"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_muon_iterates_in_bf16_only_where_it_is_native(
    monkeypatch, native: str, ns_dtype: torch.dtype
) -> None:
    from lmforge.runtime import NATIVE_BF16_ENV

    monkeypatch.setenv(NATIVE_BF16_ENV, native)
    muon, _ = build_optimizers(model(), OptimConfig(name="muon"))
    assert muon.ns_dtype == ns_dtype
    # a checkpoint of either optimizer loads into the other
    stock = torch.optim.Muon([p for g in muon.param_groups for p in g["params"]])
    stock.load_state_dict(muon.state_dict())
