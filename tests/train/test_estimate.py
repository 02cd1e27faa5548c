"""`lmforge estimate`: exact counts, an activation model that matches autograd, memory and time
arithmetic, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import Config, load_config
from lmforge.data.loader import RandomWindows
from lmforge.model.gpt import GPT
from lmforge.runtime import autocast
from lmforge.train.distributed import apply_activation_checkpointing
from lmforge.train.estimate import (
    FP32,
    activation_bytes,
    count_parameters,
    estimate,
    measured_saved_bytes,
    measured_step_peak,
    memory,
    optimizer_bytes,
    saved_activation_bytes,
    training_seconds,
)
from lmforge.train.optim import build_optimizers, split_parameters
from lmforge.train.step import Stepper, StepSettings

SMALL = [
    "model.vocab_size=96",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.block_size=32",
]
VARIANTS = [
    [],
    ["model.tie_embeddings=false", "model.bias=false"],
    ["model.position=rope", "model.norm=rmsnorm", "model.n_kv_head=2", "model.mlp=swiglu"],
    ["model.n_kv_head=1", "model.qk_norm=true", "model.mlp=relu2", "model.mlp_hidden=100"],
    [
        "model.position=rope",
        "model.qk_norm=true",
        "model.dropout=0.1",
        "model.n_kv_head=2",
        "model.logit_softcap=30.0",
    ],
]

GEMMA2 = [  # Gemma 2's shape: every option it has
    "model.position=rope",
    "model.norm=rmsnorm1p",
    "model.post_norms=true",
    "model.embed_scale=true",
    "model.mlp=geglu",
    "model.attn_softcap=50.0",
    "model.logit_softcap=30.0",
    "model.sliding_window=8",
    "model.global_every=2",
    "model.head_dim=32",
    "model.n_kv_head=2",
    "model.bias=false",
]
QWEN3 = [
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.qk_norm=true",
    "model.head_dim=32",
    "model.n_kv_head=2",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.tie_embeddings=false",
]
# the architecture options beyond VARIANTS, alone and mixed, each saving something of its own
OPTIONS = {
    "rmsnorm1p": ["model.norm=rmsnorm1p"],
    "rmsnorm1p-qk_norm": ["model.norm=rmsnorm1p", "model.qk_norm=true"],
    "post_norms": ["model.norm=rmsnorm", "model.post_norms=true"],
    "layernorm-post_norms-dropout": ["model.post_norms=true", "model.dropout=0.1"],
    "embed_scale": ["model.embed_scale=true"],
    "attn_softcap": ["model.position=rope", "model.attn_softcap=50.0"],
    "attn_softcap-qk_norm-gqa-dropout": [
        "model.attn_softcap=50.0",
        "model.qk_norm=true",
        "model.n_kv_head=2",
        "model.dropout=0.1",
    ],
    "sliding_window": ["model.position=rope", "model.sliding_window=8"],
    "global_every": ["model.position=rope", "model.sliding_window=8", "model.global_every=2"],
    "rope_local_theta": [
        "model.position=rope",
        "model.sliding_window=8",
        "model.global_every=2",
        "model.rope_local_theta=10000",
        "model.rope_theta=1000000",
    ],
    "head_dim": ["model.head_dim=32"],
    "head_dim-gqa-dropout": ["model.head_dim=32", "model.n_kv_head=2", "model.dropout=0.1"],
    "gemma2": GEMMA2,
    "gemma2-dropout": [*GEMMA2, "model.dropout=0.1"],
    "qwen3": QWEN3,
}

# VARIANTS and OPTIONS by name: every architecture the estimate is checked on
ARCHITECTURES = {**{f"variant{i}": v for i, v in enumerate(VARIANTS)}, **OPTIONS}


def config_of(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


@pytest.mark.parametrize("overrides", ARCHITECTURES.values(), ids=ARCHITECTURES)
def test_parameter_count_and_flops_are_the_models(overrides: list[str]) -> None:
    m = config_of(*overrides).model
    model = GPT(m)
    counts = count_parameters(m)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.flops_per_token == model.flops_per_token()
    assert counts.matrices == sum(p.numel() for p in split_parameters(model)["matrices"])
    assert counts.root + m.n_layer * counts.per_block == counts.total


def test_parameter_count_of_a_huge_model_costs_nothing() -> None:
    m = config_of(
        "model.n_layer=80", "model.d_model=8192", "model.n_head=64", "model.vocab_size=128256"
    ).model
    assert count_parameters(m).total > 60e9  # built on the meta device: would need 260 GB otherwise


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("overrides", ARCHITECTURES.values(), ids=ARCHITECTURES)
def test_saved_activations_match_what_autograd_saves_to_the_byte(overrides: list[str], dtype: str) -> None:
    m = config_of(*overrides).model
    tokens = torch.randint(0, m.vocab_size, (3, m.block_size))
    assert saved_activation_bytes(m, dtype, 3, cpu=True) == measured_saved_bytes(GPT(m), tokens, dtype)


def test_optimizer_state_per_optimizer() -> None:
    config = config_of()
    counts = count_parameters(config.model)
    assert optimizer_bytes(config, counts) == 2 * FP32 * counts.total
    sgd = dataclasses.replace(config, optim=dataclasses.replace(config.optim, name="sgd"))
    assert optimizer_bytes(sgd, counts) == FP32 * counts.total
    plain_sgd = dataclasses.replace(sgd, optim=dataclasses.replace(sgd.optim, momentum=0.0))
    assert optimizer_bytes(plain_sgd, counts) == 0
    muon = dataclasses.replace(plain_sgd, optim=dataclasses.replace(plain_sgd.optim, name="muon"))
    assert optimizer_bytes(muon, counts) == FP32 * counts.matrices + 2 * FP32 * (
        counts.total - counts.matrices
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("accum", [1, 4])
def test_memory_split_per_strategy(dtype: str, accum: int) -> None:
    config = config_of(
        "model.n_layer=6", "model.d_model=256", f"train.dtype={dtype}", f"train.grad_accum_steps={accum}"
    )
    counts = count_parameters(config.model)
    full = activation_bytes(config.model, dtype, 12, cpu=False, checkpointing=False)
    for ac in (False, True):
        none, ddp, fsdp = (
            memory(config, counts, s, devices=4, checkpointing=ac, cpu=False) for s in ("none", "ddp", "fsdp")
        )
        for mem in (none, ddp, fsdp):
            fixed = mem.weights + mem.optimizer + mem.buffers
            assert fixed + max(mem.activations, mem.gradients) <= mem.peak
            assert mem.peak <= fixed + mem.gradients + full.peak  # never more than everything at once
        assert none.weights == ddp.weights == FP32 * counts.total and none.gradients == FP32 * counts.total
        assert fsdp.weights == none.weights / 4 and fsdp.gradients == none.gradients / 4
        assert fsdp.optimizer == none.optimizer / 4 == 2 * FP32 * counts.total / 4
        assert ddp.buffers - none.buffers == FP32 * counts.total  # the gradient buckets
        copies = counts.linear - (
            5 * counts.linear_per_block if ac else 0
        )  # one block recast at a time with AC
        assert none.buffers == (2 * copies if dtype == "bf16" else 0)  # autocast's weight copies
        # train.batch_size (12) is the global micro-batch: DDP and FSDP split it over the 4 devices
        assert none.activations == activation_bytes(config.model, dtype, 12, cpu=False, checkpointing=ac).peak
        assert (
            ddp.activations
            == fsdp.activations
            == activation_bytes(config.model, dtype, 3, cpu=False, checkpointing=ac).peak
        )
        if accum > 1:  # gradients of earlier micro-batches live through the forward
            assert none.peak >= none.weights + none.optimizer + none.gradients + none.activations
    checkpointed = activation_bytes(config.model, dtype, 12, cpu=False, checkpointing=True)
    assert checkpointed.peak < full.peak and checkpointed.per_block < full.per_block


def test_time_arithmetic() -> None:
    assert training_seconds(1e9, 6e8, devices=8, peak_flops=1e15, mfu=0.5) == pytest.approx(
        1e9 * 6e8 / (8 * 1e15 * 0.5)
    )
    config = config_of(
        "train.max_steps=100", "train.batch_size=4", "train.grad_accum_steps=2", "train.dtype=fp32"
    )
    e = estimate(config, devices=2, device_type="h100", mfu=0.5)
    assert e.budget_tokens == 100 * 4 * 2 * 32 and e.peak_flops == 67e12  # fp32: no tensor cores
    assert e.budget_seconds == pytest.approx(e.budget_tokens * e.params.flops_per_token / (2 * 67e12 * 0.5))
    assert e.budget_seconds < e.budget_seconds_ac < 4 / 3 * e.budget_seconds * 1.01
    assert e.chinchilla_tokens == 20 * e.params.total
    assert e.chinchilla_seconds / e.budget_seconds == pytest.approx(e.chinchilla_tokens / e.budget_tokens)
    bf16 = estimate(config_of("train.dtype=bf16"), device_type="a100", tokens=1e6, peak_flops=None)
    assert bf16.peak_flops == 312e12 and bf16.budget_tokens == 1e6 and bf16.budget_source == "--tokens"
    auto = estimate(config_of(), device_type="a100")  # train.dtype = "auto": what the trainer would pick
    assert (
        auto.dtype == "bf16"
        and auto.peak_flops == 312e12
        and "train.dtype auto is bf16 on a100" in auto.notes
    )
    given = estimate(config_of(), device_type="cpu", peak_flops=1e11)
    assert given.peak_flops == 1e11 and given.peak_flops_source == "given"


def test_vocab_size_comes_from_prepared_data(char_data: Path) -> None:
    config = load_config(None, [f"data.dir={char_data}"])
    e = estimate(config, peak_flops=1e11)
    assert e.model.vocab_size == json.loads((char_data / "meta.json").read_text())["vocab_size"]
    assert e.params.total == GPT(e.model).num_params()
    assert config.model.vocab_size is None  # the estimate's model is a copy


def test_cli_prints_the_table_and_json(cli, tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[model]\nvocab_size = 96\nn_layer = 2\nd_model = 64\nn_head = 4\nblock_size = 32\n")
    code, out, err = cli("estimate", path, "--set", "train.max_steps=10", "--devices", "2")
    assert code == 0, err
    params = GPT(load_config(path).model).num_params()
    assert f"parameters        {params:,} (exact" in out
    for word in (
        "FLOPs per token",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "peak",
        "fsdp+ac",
        "Chinchilla",
        "measured",
    ):
        assert word in out
    assert "6 x layers x d_model x block_size: causal, half the score matrix" in out
    assert "time at fraction of measured matmul peak 40% of 2 x" in out  # a CPU: no MFU as the field means it
    code, out, err = cli(
        "estimate", path, "--json", "--device-type", "h200", "--mfu", "0.3", "--tokens", "1e9"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["params"]["total"] == params and result["budget_tokens"] == 1e9 and result["mfu"] == 0.3
    assert set(result["memory"]) == {"none", "none+ac", "ddp", "ddp+ac", "fsdp", "fsdp+ac"}
    assert result["peak_flops"] == 989e12 and result["dtype"] == "bf16"  # train.dtype auto on an H200
    assert result["peak_flops_source"] == "h200 bf16 dense, datasheet" and not result["peak_measured"]


def test_a_cpu_estimate_takes_trainings_peak_the_best_measured_on_this_machine() -> None:
    import os

    from lmforge.runtime import PEAK_CACHE_FILE, machine_key

    cache = Path(os.environ["LMFORGE_CACHE_DIR"]) / PEAK_CACHE_FILE  # this test's own (tests/conftest.py)
    cache.write_text(json.dumps({machine_key(torch.device("cpu"), "fp32"): 5e14}))
    e = estimate(config_of("train.dtype=fp32"))
    assert (
        e.peak_flops == 5e14
        and e.peak_measured
        and e.peak_flops_source == "measured, the best on this machine"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.toml"], "missing.toml: no such config file, nor a recipe of that name"),
        (["{cfg}", "--mfu", "0"], "--mfu must be in (0, 1], got 0.0"),
        (["{cfg}", "--mfu", "2"], "--mfu must be in (0, 1], got 2.0"),
        (["{cfg}", "--mfu", "fast"], "--mfu expects a number, got 'fast'"),
        (["{cfg}", "--devices", "0"], "--devices must be at least 1, got 0"),
        (["{cfg}", "--devices", "1.5"], "--devices expects an integer, got '1.5'"),
        (["{cfg}", "--device-type", "tpu"], "--device-type must be one of cpu, a100, h100, h200; got 'tpu'"),
        (["{cfg}", "--tokens", "-5"], "--tokens must be positive, got -5.0"),
        (["{cfg}", "--set", "model.vocab_size=0"], "model.vocab_size must be positive"),
        (["{cfg}", "--set", "model.vocab_size=null_"], "model.vocab_size must be an integer"),
    ],
)
def test_cli_bad_input_is_one_line(cli, tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[model]\nvocab_size = 96\n")
    code, out, err = cli("estimate", *[a.replace("{cfg}", str(path)) for a in args])
    assert code == 1 and out == ""
    assert err.startswith("lmforge estimate: error: ") and err.count("\n") == 1 and message in err


def test_cli_without_vocab_size_names_the_key(cli, tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\ndir = "{tmp_path / "nothing"}"\n')
    code, _, err = cli("estimate", path)
    assert code == 1 and err.count("\n") == 1
    assert "model.vocab_size is not set" in err and "has no prepared data" in err


def test_init_from_gives_the_checkpoints_architecture(cli, char_data: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY

    overrides = sum((["--set", item] for item in [*TINY, "train.max_steps=2", f"data.dir={char_data}"]), [])
    code, _, err = cli("train", *overrides, "--out", tmp_path / "run")
    assert code == 0, err
    path = tmp_path / "finetune.toml"
    path.write_text(f'[model]\nn_layer = 12\n[train]\ninit_from = "{tmp_path / "run"}"\n')
    code, out, err = cli("estimate", path, "--json", "--peak-flops", "1e11")
    assert code == 0, err
    trained = load_config(tmp_path / "run" / "config.toml").model
    assert json.loads(out)["params"]["total"] == GPT(trained).num_params()
    assert "architecture of train.init_from" in json.loads(out)["notes"][0]


def cpu_stepper(model: GPT, config: Config, settings: StepSettings, objective=None) -> Stepper:
    """The training loop's step on the CPU, in train.dtype, with config's optimizers."""
    return Stepper(
        model,
        build_optimizers(model, config.optim),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        amp=autocast(torch.device("cpu"), config.train.dtype),
        device=torch.device("cpu"),
        settings=settings,
        objective=objective,
    )


def measured_peak(config: Config, *, checkpointing: bool) -> int:
    """Peak tensor bytes of a steady full-training step on CPU (as benchmarks/estimate_memory.py)."""
    m, t = config.model, config.train
    torch.manual_seed(0)
    model = GPT(m)
    if checkpointing:
        apply_activation_checkpointing(model)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, size=4 * m.block_size * t.batch_size)
    stepper = cpu_stepper(model, config, StepSettings(grad_accum_steps=1, grad_clip=config.optim.grad_clip))
    batches = RandomWindows(tokens.astype(np.uint32), m.block_size, t.batch_size, seed=0)
    model.train()
    stepper.gradients(batches)  # a first step creates AdamW's moments
    stepper.update()
    return measured_step_peak(stepper, batches)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_soft_capped_attentions_peak_holds_its_t_by_t_gradients(checkpointing: bool) -> None:
    # 256 positions: the score matrices outweigh the rest of a block, and the step's peak is in the
    # softmax's backward, with two T x T gradients alive (0.80-0.93 of the measured peak without them)
    config = config_of("model.attn_softcap=50.0", "model.block_size=256", "train.batch_size=2")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, dtype="fp32"))
    estimated = memory(
        config, count_parameters(config.model), "none", devices=1, checkpointing=checkpointing, cpu=True
    )
    measured = measured_peak(config, checkpointing=checkpointing)
    assert estimated.peak == pytest.approx(measured, rel=0.10), (estimated.peak, measured)


def measured_preference_peak(config: Config) -> int:
    """Peak tensor bytes of a steady CPU step of train.objective (dpo or simpo) on batch_size pairs,
    each side's first quarter a masked prompt; dpo's frozen reference (a resident copy) included."""
    from lmforge.targets import IGNORE_INDEX
    from lmforge.train.objective import PreferenceLoss, frozen_reference

    m, t = config.model, config.train
    torch.manual_seed(0)
    model, reference = GPT(m), None
    if t.objective == "dpo":
        reference = GPT(m)
        reference.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x, y = torch.randint(0, m.vocab_size, (2, 2 * t.batch_size, m.block_size), generator=generator)
            y[:, : m.block_size // 4] = IGNORE_INDEX
            yield x, y

    objective = PreferenceLoss(config.preference, reference and frozen_reference(reference))
    stepper = cpu_stepper(
        model, config, StepSettings(only_targets=True, loss_per_row=True), objective=objective
    )
    stepper.gradients(batches())  # a first step creates AdamW's moments
    stepper.update()
    resident = 0 if reference is None else FP32 * sum(p.numel() for p in reference.parameters())
    return measured_step_peak(stepper, batches()) + resident


# simpo: rows only; dpo: the reference's forward is counted as a block's saved tensors, an upper bound
@pytest.mark.parametrize(("objective", "low", "high"), [("simpo", 0.95, 1.05), ("dpo", 1.0, 1.1)])
def test_a_preference_steps_peak_counts_both_sides_of_each_pair_and_dpos_reference(
    objective: str, low: float, high: float
) -> None:
    overrides = ["model.n_layer=2", "model.d_model=128", "model.vocab_size=256", "model.block_size=64"]
    config = config_of(*overrides, "train.batch_size=4", "train.dtype=fp32", "data.kind=sft")
    # set past validation: a dpo config names train.init_from, whose architecture would replace this one
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, objective=objective))
    estimated = estimate(config, peak_flops=1e12)
    assert estimated.micro_batch == 8  # 4 pairs: 8 sequences
    assert "batch_size 4 x 2 sides" in estimated.budget_source
    ratio = estimated.memory["none"].peak / measured_preference_peak(config)
    assert low <= ratio <= high, ratio  # before: 0.74 (simpo) and 0.58 (dpo), half the rows and no reference


def test_a_batch_that_does_not_split_over_the_devices_is_noted_as_train_refuses_it() -> None:
    """`train` under torchrun refuses batch_size 8 on 3 processes: the DDP/FSDP rows say so."""
    config = load_config(None, ["model.vocab_size=96", "train.batch_size=8"])
    (note,) = [n for n in estimate(config, devices=3, peak_flops=1e11).notes if "split" in n]
    assert "train.batch_size 8 does not split over 3 devices" in note and "3 sequences a device" in note
    assert not [n for n in estimate(config, devices=4, peak_flops=1e11).notes if "split" in n]
