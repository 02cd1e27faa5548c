"""Differentially private training ([privacy], DP-SGD through Opacus)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("opacus")

from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402

from lmforge.checkpoint.folder import checkpoint_path  # noqa: E402
from lmforge.config import Config, ModelConfig, load_config  # noqa: E402
from lmforge.data.loader import PoissonWindows  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop.hf import export_checkpoint  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.train import privacy  # noqa: E402, F401  (registers the QK-norm's grad sampler)
from lmforge.train.trainer import train  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tests.train.conftest import read_metrics  # noqa: E402

PRIVATE = [*TINY, "privacy.noise_multiplier=1.0", "train.max_steps=20", "train.eval_interval=5"]


def private_config(config_file: Path, *extra: str) -> Config:
    return load_config(config_file, [*PRIVATE, *extra])


ARCHITECTURES = {  # together: every kind of parameter the model can have
    "llama-like": dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=1),
    "gpt2-like": dict(position="learned", norm="layernorm", mlp="gelu", bias=True),
    # nanoGPT's bias = False: LayerNorm without a bias (Opacus's own sampler assumes one)
    "nanogpt-bias-free": dict(position="learned", norm="layernorm", mlp="gelu", bias=False),
    "speedrun-like": dict(
        position="rope",
        norm="rmsnorm",
        mlp="relu2",
        qk_norm=True,
        tie_embeddings=False,
        bias=False,
        logit_softcap=15.0,
    ),  # fmt: skip
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_sample_gradients_equal_each_examples_own_gradient(arch: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=8, vocab_size=11, **ARCHITECTURES[arch])
    model = GPT(config)
    reference = copy.deepcopy(model)
    x, y = torch.randint(11, (3, 8)), torch.randint(11, (3, 8))
    model.per_sample_positions = True
    _, loss = GradSampleModule(model, batch_first=True, loss_reduction="mean")(x, y)
    loss.backward()
    for i in range(3):  # brute force: one example at a time
        reference.zero_grad()
        reference(x[i : i + 1], y[i : i + 1])[1].backward()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert p.grad_sample.shape == (3, *p.shape), name
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_poisson_windows_include_each_disjoint_window_with_probability_q() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = PoissonWindows(tokens, block_size=9, batch_size=10, seed=0)  # 100 windows of 10 tokens
    assert sampler.windows == 100 and sampler.sample_rate == 0.1
    sizes, counts = [], np.zeros(100)
    for _ in range(2000):
        x, y = next(sampler)
        assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] % 10 == 0).all()  # whole, aligned windows
        starts = (x[:, 0] // 10).numpy()
        assert len(set(starts)) == len(starts)  # each window at most once per batch
        counts[starts] += 1
        sizes.append(len(x))
    assert 9.7 < np.mean(sizes) < 10.3 and min(sizes) < 6 < 14 < max(sizes)  # variable, mean q * windows
    assert 150 < counts.min() and counts.max() < 250  # every window about 2000 * 0.1 times
    state = sampler.state_dict()
    again = PoissonWindows(tokens, 9, 10, seed=123)
    again.load_state_dict(state)
    assert all(torch.equal(next(sampler)[0], next(again)[0]) for _ in range(5))


@pytest.mark.slow
def test_private_run_logs_epsilon_at_every_eval_as_the_accountant_computes_it(
    config_file: Path, tmp_path: Path
) -> None:
    summary = train(private_config(config_file), tmp_path / "run")
    _, evals = read_metrics(tmp_path / "run")
    epsilons = [e["epsilon"] for e in evals]
    assert [e["step"] for e in evals] == [5, 10, 15, 20]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # spent privacy only grows
    meta = json.loads((summary.checkpoint / "meta.json").read_text())["privacy"]
    accountant = RDPAccountant()
    accountant.history = [(1.0, meta["sample_rate"], 20)]
    assert epsilons[-1] == pytest.approx(accountant.get_epsilon(1e-5)) == meta["epsilon"] == summary.epsilon
    assert meta["steps"] == 20 and meta["noise_multiplier"] == 1.0 and meta["delta"] == 1e-5
    export_checkpoint(tmp_path / "run", tmp_path / "hf", which="last")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"epsilon = {meta['epsilon']:.3f}, delta = 1e-05" in card


@pytest.mark.slow
def test_target_epsilon_sets_the_noise_to_spend_it_by_max_steps(config_file: Path, tmp_path: Path) -> None:
    config = load_config(config_file, [*TINY, "privacy.target_epsilon=8", "train.max_steps=10"])
    summary = train(config, tmp_path / "run")
    assert summary.epsilon == pytest.approx(8.0, rel=0.01)


@pytest.mark.slow
def test_resumed_private_run_has_the_weights_and_epsilon_of_an_uninterrupted_one(
    config_file: Path, tmp_path: Path
) -> None:
    shorter = ["model.dropout=0.1", "train.max_steps=10", "train.checkpoint_interval=5"]
    whole = train(private_config(config_file, *shorter), tmp_path / "whole")
    train(private_config(config_file, *shorter), tmp_path / "resumed")
    last = checkpoint_path(tmp_path / "resumed", 10)
    for path in last.iterdir():  # back to the step-5 checkpoint, as if killed after it
        path.unlink()
    last.rmdir()
    resumed = train(private_config(config_file, *shorter), tmp_path / "resumed", resume=True)
    assert resumed.epsilon == whole.epsilon
    losses = [[e["loss"] for e in read_metrics(tmp_path / run)[0]] for run in ("whole", "resumed")]
    assert len(losses[1]) == 10 and losses[0] == losses[1]
    weights = [
        load_file(checkpoint_path(tmp_path / run, 10) / "model.safetensors") for run in ("whole", "resumed")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(LmforgeError, match=r"trained with \[privacy\], cannot be resumed without it"):
        train(load_config(config_file, [*TINY, *shorter]), tmp_path / "resumed", resume=True)


def test_resuming_with_another_accountant_is_a_one_line_error_naming_the_key(
    config_file: Path, tmp_path: Path
) -> None:
    short = ["train.max_steps=2", "train.checkpoint_interval=2", "train.eval_interval=2"]
    train(private_config(config_file, *short), tmp_path / "run")
    longer = private_config(config_file, *short, "train.max_steps=4", "privacy.accountant=prv")
    with pytest.raises(LmforgeError, match=r"privacy\.accountant = 'prv'.*'rdp'") as error:
        train(longer, tmp_path / "run", resume=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "setting, key",
    [
        ("parallel.strategy=fsdp", "parallel.strategy"),
        ("parallel.strategy=ddp", "parallel.strategy"),
        ("train.grad_accum_steps=2", "train.grad_accum_steps"),
        ("train.dtype=bf16", "train.dtype"),
        ("train.compile=true", "train.compile"),
        ("train.activation_checkpointing=true", "train.activation_checkpointing"),
        ("lora.rank=4", "lora.rank"),
        ("data.kind=sft", "data.kind"),
        ("privacy.target_epsilon=3", "privacy.target_epsilon"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("privacy.delta=1", "privacy.delta"),
    ],
)
def test_settings_dp_sgd_cannot_honour_are_one_line_errors_naming_the_key(
    config_file: Path, setting: str, key: str
) -> None:
    with pytest.raises(LmforgeError, match=key.replace(".", r"\.")) as error:
        private_config(config_file, setting)
    assert "\n" not in str(error.value)
