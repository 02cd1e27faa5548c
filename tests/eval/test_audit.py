"""`lmforge audit`: canary exposure, verbatim memorisation and membership inference, on a tiny
model overfit to a repetitive train split with one group of canaries inserted 64 times."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, DataConfig, ModelConfig
from lmforge.data import PreparedData, prepare
from lmforge.data.canaries import CanarySpec
from lmforge.eval.audit import (
    AuditOptions,
    AuditReport,
    audit_checkpoint,
    exposure_from_fit,
    exposure_from_sample,
    roc_auc,
)
from lmforge.inference import ModelSource
from lmforge.model import GPT

TRAIN_TEXT = "the quick brown fox jumps over the lazy dog\nall work and no play makes jack a dull boy\n" * 60
VAL_TEXT = "pack my box with five dozen liquor jugs now\n" * 12
SMALL = AuditOptions(alternatives=500, prefixes=32, prefix_tokens=16, k=8, sequences=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer model trained 150 steps on TRAIN_TEXT with canaries repeated 0 and 64 times."""
    root = tmp_path_factory.mktemp("audit")
    (root / "text.txt").write_text(TRAIN_TEXT + VAL_TEXT)
    fraction = len(VAL_TEXT) / len(TRAIN_TEXT + VAL_TEXT)
    canaries = CanarySpec(2, (0, 64), seed=0)
    prepare(
        str(root / "text.txt"),
        root / "data",
        "char",
        val_fraction=fraction,
        progress=False,
        canaries=canaries,
    )
    data = PreparedData.open(root / "data")
    config = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=32, vocab_size=data.vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in itertools.islice(data.train_batches(32, 16, seed=0), 150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run_config = Config(model=config, data=DataConfig(dir=str(root / "data")))
    save_checkpoint(root / "run", 150, model, {}, run_config, root / "data" / "tokenizer.json", loss.item())
    return root / "run"


def test_auc_is_the_rank_formula() -> None:
    rng = np.random.default_rng(0)
    same = roc_auc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same - 0.5) < 0.03  # identical distributions
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5  # ties count half
    pos, neg = rng.integers(0, 5, size=30).astype(float), rng.integers(0, 5, size=20).astype(float)
    pairs = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert math.isclose(roc_auc(pos, neg), pairs)


def test_exposure_estimates() -> None:
    alternatives = np.random.default_rng(0).normal(10.0, 1.0, size=999)
    assert exposure_from_sample(0.0, alternatives) == math.log2(1000)  # below every alternative
    assert exposure_from_sample(100.0, alternatives) == 0.0  # above every one
    assert abs(exposure_from_sample(10.0, alternatives) - 1.0) < 0.15  # the median: rank |R| / 2
    assert abs(exposure_from_fit(10.0, alternatives, 10**6) - 1.0) < 0.1
    assert exposure_from_fit(-100.0, alternatives, 10**6) == math.log2(10**6)  # capped at log2 |R|


@pytest.fixture(scope="module")
def report(overfit_run: Path) -> AuditReport:
    return audit_checkpoint(ModelSource(overfit_run, "last", "cpu", "fp32"), None, None, SMALL)


def test_a_canary_inserted_64_times_is_exposed_and_one_never_inserted_is_not(report: AuditReport) -> None:
    rows = {row["repeats"]: row for row in report.exposure_by_repeats()}
    assert rows[64]["exposure_sampled"] > 8.0  # near the ceiling log2(501) = 8.97
    assert rows[64]["exposure_fit"] > 15.0
    assert rows[0]["exposure_sampled"] < 5.0 and rows[0]["exposure_fit"] < 6.0


def test_an_overfit_model_reproduces_train_prefixes_and_tells_members_apart(report: AuditReport) -> None:
    memorised, members = report.memorisation, report.membership
    assert memorised.train_exact > 0.5 and memorised.val_exact < 0.1
    assert members.auc > 0.95 and members.train_loss < members.val_loss


def test_audit_prints_a_table_or_json(cli, overfit_run: Path) -> None:
    options = [
        "--alternatives",
        "200",
        "--prefixes",
        "8",
        "--prefix-tokens",
        "16",
        "--k",
        "8",
        "--sequences",
        "8",
    ]
    code, out, err = cli("audit", overfit_run, *options, "--device", "cpu")
    assert code == 0, err
    assert 'canary exposure: "my PIN is D D D D D D", |R| = 1,000,000' in out
    assert "verbatim memorisation" in out and "membership inference by loss" in out
    code, out, _ = cli("audit", overfit_run, *options, "--device", "cpu", "--json")
    result = json.loads(out)
    assert [row["repeats"] for row in result["exposure"]["by_repeats"]] == [0, 64]
    assert len(result["exposure"]["canaries"]) == 4 and result["membership"]["sequences"] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prefix-tokens", "30", "--k", "8"],
            "--prefix-tokens 30 + --k 8 is more than the model's block_size 32",
        ),
        (["--sequence-tokens", "64"], "--sequence-tokens 64 is more than the model's block_size 32"),
        (["--canaries", "nope.json"], "nope.json: no such canaries file"),
    ],
)
def test_bad_audit_options_are_one_line_errors(cli, overfit_run: Path, args: list[str], message: str) -> None:
    code, out, err = cli("audit", overfit_run, "--prefix-tokens", "16", "--k", "8", *args)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lmforge audit: error: ") and message in err


def test_without_canaries_the_audit_says_so(cli, overfit_run: Path, tmp_path: Path) -> None:
    data = overfit_run.parent / "data"
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        (plain / name).write_bytes((data / name).read_bytes())
    code, out, _ = cli(
        "audit",
        overfit_run,
        "--data",
        plain,
        "--prefix-tokens",
        "16",
        "--k",
        "8",
        "--sequences",
        "8",
        "--prefixes",
        "8",
    )
    assert code == 0 and f"canary exposure: no canaries.json in {plain}" in out


def test_plot_audit_draws_exposure_and_auc_of_runs_with_and_without_dp(
    cli, overfit_run: Path, tmp_path: Path
) -> None:
    options = ["--alternatives", "200", "--prefixes", "8", "--prefix-tokens", "16", "--k", "8"]
    code, out, err = cli("audit", overfit_run, *options, "--sequences", "8", "--device", "cpu", "--json")
    assert code == 0, err
    for name, privacy in (("plain", ""), ("dp", "[privacy]\ntarget_epsilon = 8.0\n")):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "config.toml").write_text(f"[model]\nn_layer = 2\n{privacy}")
        (tmp_path / name / "audit-0000150.json").write_text(out)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_audit.py"
    picture = tmp_path / "exposure.png"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "plain"), str(tmp_path / "dp"), "--out", str(picture)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {picture}" in done.stdout
