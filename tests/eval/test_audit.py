"""`lmforge audit`: canary exposure, verbatim memorisation and membership inference, on a tiny
model overfit to a train split of random lines, with one group of canaries inserted 64 times and
held-out lines drawn from the same lines as the members."""

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
from lmforge.errors import LmforgeError
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

WORDS = "fox dog cat owl bee elk yak ant bat cow hen pig ram emu gnu jay".split()
# 200 lines of 10 random words: members and held-out lines are drawn from these alike.
LINES = [" ".join(np.random.default_rng(0).choice(WORDS, size=(200, 10))[i]) for i in range(200)]
# The val split (the file's tail) is other text on purpose: the held-out lines, not val, are the
# non-members, so the membership AUC must not move with what val holds.
VAL_TEXT = "PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS\n" * 20
SMALL = AuditOptions(alternatives=500, prefixes=32, prefix_tokens=16, k=8, sequences=100)
STEPS = 1000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer model saved untrained (step 0) and after 1,000 steps at a high learning rate on a
    train split of ~100 member lines, with canaries repeated 0 and 64 times; ~100 lines held out."""
    root = tmp_path_factory.mktemp("audit")
    text = "".join(line + "\n" for line in LINES)
    (root / "text.txt").write_text(text + VAL_TEXT)
    prepare(
        str(root / "text.txt"),
        root / "data",
        "char",
        val_fraction=len(VAL_TEXT) / len(text + VAL_TEXT),
        progress=False,
        canaries=CanarySpec(2, (0, 64), seed=0),
        holdout_lines=100,  # of the 200 train lines: each is a member or held out, ~100 of each
    )
    data = PreparedData.open(root / "data")
    config = ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=32, vocab_size=data.vocab_size)
    run_config = Config(model=config, data=DataConfig(dir=str(root / "data")))
    torch.manual_seed(0)
    model = GPT(config)
    save_checkpoint(
        root / "run",
        0,
        model,
        state={},
        config=run_config,
        tokenizer_file=root / "data" / "tokenizer.json",
        val_loss=None,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in itertools.islice(data.train_batches(32, 16, seed=0), STEPS):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(
        root / "run",
        STEPS,
        model,
        state={},
        config=run_config,
        tokenizer_file=root / "data" / "tokenizer.json",
        val_loss=loss.item(),
    )
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
    return audit_checkpoint(ModelSource(overfit_run, "last", "cpu", "fp32"), None, None, options=SMALL)


def untrained(run: Path) -> str:
    return str(run / "checkpoints" / "step-0000000")


def test_a_canary_inserted_64_times_is_exposed_and_one_never_inserted_is_not(report: AuditReport) -> None:
    rows = {row["repeats"]: row for row in report.exposure_by_repeats()}
    assert rows[64]["exposure_sampled"] > 8.0  # near the ceiling log2(501) = 8.97
    assert rows[64]["exposure_fit"] > 15.0
    assert rows[0]["exposure_sampled"] < 5.0 and rows[0]["exposure_fit"] < 6.0


def test_an_overfit_model_reproduces_train_prefixes(report: AuditReport) -> None:
    memorised = report.memorisation
    assert memorised.train_exact > 0.1 and memorised.train_token_match > 0.4  # ~0.2 and ~0.55 here
    assert memorised.val_exact == 0.0


def test_an_untrained_model_cannot_tell_members_from_held_out_lines(overfit_run: Path) -> None:
    report = audit_checkpoint(
        ModelSource(overfit_run, untrained(overfit_run), "cpu", "fp32"), None, None, options=SMALL
    )
    members = report.membership
    assert members.lines >= 80  # as many held-out lines as members, picked alike from LINES
    # Members and held-out lines are exchangeable here, so the AUC is that of two samples from one
    # distribution: with n = 80-100 per side its deviation is sqrt((2n + 1) / (12 n^2)) <= 0.046,
    # and 0.15 is more than 3 of them: a correct audit fails this for fewer than 1 seed in 1,000.
    assert abs(members.auc - 0.5) < 0.15


def test_an_overfit_model_tells_members_from_held_out_lines(report: AuditReport) -> None:
    members = report.membership
    # 0.8 here: over 6 deviations of the null's 0.046 above chance (0.7 is over 4)
    assert members.auc > 0.7 and members.member_loss < members.held_out_loss


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
    assert "verbatim memorisation" in out
    assert "membership inference by loss: 8 lines trained on vs 8 held out, picked alike" in out
    code, out, _ = cli("audit", overfit_run, *options, "--device", "cpu", "--json")
    result = json.loads(out)
    assert [row["repeats"] for row in result["exposure"]["by_repeats"]] == [0, 64]
    assert len(result["exposure"]["canaries"]) == 4 and result["membership"]["lines"] == 8


def test_memorisation_lengths_default_to_what_fits_the_block(cli, overfit_run: Path) -> None:
    # The defaults (a 64-token prefix, k = 32) do not fit a 32-token block: half of it each
    options = ["--alternatives", "50", "--prefixes", "4", "--sequences", "4", "--device", "cpu", "--json"]
    code, out, err = cli("audit", overfit_run, *options)
    assert code == 0, err
    memorised = json.loads(out)["memorisation"]
    assert (memorised["prefix_tokens"], memorised["k"]) == (16, 16)
    code, out, err = cli("audit", overfit_run, *options, "--k", "4")
    assert code == 0, err
    memorised = json.loads(out)["memorisation"]
    assert (memorised["prefix_tokens"], memorised["k"]) == (28, 4)


@pytest.mark.parametrize(
    ("block_size", "prefix_tokens", "k", "fitted"),
    [
        (1024, None, None, (64, 32)),
        (96, None, None, (64, 32)),
        (64, None, None, (32, 32)),
        (16, None, None, (8, 8)),
        (2, None, None, (1, 1)),
        (64, 60, None, (60, 4)),
        (64, None, 48, (16, 48)),
        (64, 10, 20, (10, 20)),
    ],
)
def test_fitted_options_fill_in_the_lengths_not_given(
    block_size: int, prefix_tokens: int | None, k: int | None, fitted: tuple[int, int]
) -> None:
    options = AuditOptions(prefix_tokens=prefix_tokens, k=k).fitted(block_size)
    assert (options.prefix_tokens, options.k) == fitted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prefix-tokens", "30", "--k", "8"],
            "--prefix-tokens 30 + --k 8 is more than the model's block_size 32",
        ),
        (["--prefix-tokens", "32"], "--prefix-tokens 32 leaves no room for --k in the model's block_size 32"),
        (["--k", "40"], "--k 40 leaves no room for --prefix-tokens in the model's block_size 32"),
        (["--canaries", "nope.json"], "nope.json: no such canaries file"),
    ],
)
def test_bad_audit_options_are_one_line_errors(cli, overfit_run: Path, args: list[str], message: str) -> None:
    code, out, err = cli("audit", overfit_run, *args)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lmforge audit: error: ") and message in err


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ({"prefix": "my PIN is ", "digits": 20, "separator": " "}, "digits must be between 1 and 18, got 20"),
        # a char vocabulary drops the unknown character: the secrets scored would be other text
        ({"prefix": "my PIN № ", "digits": 6, "separator": " "}, "the model's tokenizer cannot represent"),
    ],
)
def test_a_canaries_file_the_audit_cannot_score_is_a_one_line_error(
    cli, overfit_run: Path, tmp_path: Path, fmt: dict, message: str
) -> None:
    canaries = [{"secret": "1" * fmt["digits"], "repeats": 1}]
    (tmp_path / "canaries.json").write_text(json.dumps({"format": fmt, "canaries": canaries}))
    code, out, err = cli("audit", overfit_run, "--canaries", tmp_path / "canaries.json", "--prefixes", "4")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lmforge audit: error: ") and message in err


def test_a_block_of_one_token_has_no_room_for_memorisation() -> None:
    with pytest.raises(LmforgeError, match="block_size 1 leaves no room"):
        AuditOptions().fitted(1)


def test_without_canaries_or_held_out_lines_the_audit_says_so(cli, overfit_run: Path, tmp_path: Path) -> None:
    data = overfit_run.parent / "data"
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        (plain / name).write_bytes((data / name).read_bytes())
    options = ["--data", plain, "--sequences", "8", "--prefixes", "8", "--device", "cpu"]
    code, out, _ = cli("audit", overfit_run, *options)
    assert code == 0 and f"canary exposure: no canaries.json in {plain}" in out
    assert f"membership inference: no membership.json in {plain} (prepare with --holdout-lines N)" in out
    code, out, _ = cli("audit", overfit_run, *options, "--json")
    assert json.loads(out)["membership"] is None


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
