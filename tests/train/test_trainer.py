import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import Config, load_config
from lmforge.data.tokenizer import byte_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference import load
from lmforge.recipes import RECIPES_DIR
from lmforge.train.run import prepare_run_dir
from lmforge.train.trainer import train
from tests.conftest import BF16_EPS, PIN_FP32, TINY, snapshot
from tests.train.conftest import lmforge, read_metrics, wait_for_step


def sets(*items: str) -> list[str]:
    """`--set ITEM` for each item."""
    return [arg for item in items for arg in ("--set", item)]


def run_train(cli, config_file: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli("train", config_file, "--out", out, *sets(*TINY, *extra))


def test_loss_decreases_and_everything_is_logged(cli, config_file: Path, tmp_path: Path) -> None:
    code, out, err = run_train(cli, config_file, tmp_path / "run")
    assert code == 0, err
    assert "done: 40 steps" in out and "val loss" in out
    steps, evals = read_metrics(tmp_path / "run")
    assert [e["step"] for e in steps] == list(range(1, 41))
    logged = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "tokens", "peak_flops"}
    assert set(steps[0]) == logged | {"matmul_peak_fraction"}  # a CPU's peak is measured: no MFU
    assert [e["tokens"] for e in steps] == [8 * 32 * step for step in range(1, 41)]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    assert set(evals[0]) == {"step", "val_loss", "val_ppl", "val_bpb"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(59)
    assert sum(e["loss"] for e in steps[-5:]) < sum(e["loss"] for e in steps[:5]) - 5 * 0.5
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert evals[-1]["val_bpb"] == pytest.approx(
        evals[-1]["val_loss"] / math.log(2)
    )  # ASCII: 1 byte per token
    assert steps[0]["lr"] == pytest.approx(3e-3 / 6)  # warmup (step + 1) / (warmup + 1)
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.model.n_layer == 2 and saved.model.vocab_size == 59  # resolved from the data
    # keep_checkpoints=2 keeps the two newest; val loss fell at every eval, so best is the newest
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000030", "step-0000040"]


def test_the_log_and_the_summary_give_the_best_peak_cached_for_this_machine(
    cli, config_file: Path, tmp_path: Path
) -> None:
    """A peak probed while other jobs run reads low; the best one measured here is the denominator."""
    from lmforge.runtime import PEAK_CACHE_FILE, machine_key

    cpu = torch.device("cpu")
    cache = Path(os.environ["LMFORGE_CACHE_DIR"]) / PEAK_CACHE_FILE  # this test's own (tests/conftest.py)
    cache.write_text(json.dumps({machine_key(cpu, dtype): 5e14 for dtype in ("fp32", "bf16")}))
    code, out, err = run_train(cli, config_file, tmp_path / "run", "train.max_steps=3")
    assert code == 0, err
    steps, _ = read_metrics(tmp_path / "run")
    assert [e["peak_flops"] for e in steps] == [5e14] * 3
    assert all(0 < e["matmul_peak_fraction"] < 1e-3 and "mfu" not in e for e in steps)
    assert "fraction of measured matmul peak against 500 TFLOP/s (measured, the best on this machine)" in out
    done = out.splitlines()[-1]
    assert (
        done.startswith("done: 3 steps") and "fraction of measured matmul peak 0.0% (peak 500 TFLOP/s" in done
    )


def test_a_step_over_the_peak_is_flagged_as_a_measurement_error_not_logged_as_mfu(
    cli, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge import runtime

    monkeypatch.setattr(runtime, "matmul_peak_flops", lambda device, dtype: 1e6)  # as if probed far too low
    code, out, err = run_train(cli, config_file, tmp_path / "run", "train.max_steps=3")
    assert code == 0, err
    steps, _ = read_metrics(tmp_path / "run")
    assert all(e["over_peak"] > 1 and e["peak_flops"] == 1e6 for e in steps)
    assert not any("matmul_peak_fraction" in e or "mfu" in e for e in steps)
    assert out.count("over the peak of 0.001 GFLOP/s") == 2  # the first such step, and the summary
    done = out.splitlines()[-1]
    assert "a measurement error, no MFU" in done and "%" not in done.partition("val loss")[0]


def test_eval_cli_matches_training_eval(cli, config_file: Path, tmp_path: Path) -> None:
    assert run_train(cli, config_file, tmp_path / "run", PIN_FP32)[0] == 0
    _, evals = read_metrics(tmp_path / "run")
    code, out, err = cli("eval", tmp_path / "run", "--checkpoint", "last", "--json")  # dtype: the run's
    assert code == 0, err
    result = json.loads(out)
    assert result["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6)
    assert result["tokens"] == 6000 - 1 and result["step"] == 40
    assert {"val_loss", "val_ppl", "tokens", "bpb"} <= set(result)
    code, out, _ = cli("eval", tmp_path / "run" / "checkpoints" / "step-0000030")
    assert code == 0 and "(step 30)" in out and "loss" in out


@pytest.mark.bf16
def test_eval_cli_matches_training_eval_in_bf16(cli, config_file: Path, tmp_path: Path) -> None:
    assert run_train(cli, config_file, tmp_path / "run", "train.dtype=bf16")[0] == 0
    _, evals = read_metrics(tmp_path / "run")
    code, out, err = cli("eval", tmp_path / "run", "--checkpoint", "last", "--dtype", "bf16", "--json")
    assert code == 0, err
    # other batch shapes round bf16 matmuls differently: the mean loss agrees to bf16's unit roundoff
    assert json.loads(out)["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=BF16_EPS)


@pytest.mark.bf16
def test_resume_in_bf16_is_bit_exact(cli, config_file: Path, tmp_path: Path) -> None:
    """At one world size bf16 autocast rounds the same way every time: a resumed run is bit-exact."""
    bf16 = ["train.dtype=bf16", "model.dropout=0.1"]  # dropout: the RNG state must resume too
    assert run_train(cli, config_file, tmp_path / "run", *bf16)[0] == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    for c in ckpt.list_checkpoints(resumed):
        if c.step > 30:  # stopped after step 30
            shutil.rmtree(c.path)
    code, _, err = cli("train", config_file, "--out", resumed, "--resume", *sets(*TINY, *bf16))
    assert code == 0, err
    (steps, evals), (ref_steps, ref_evals) = read_metrics(resumed), read_metrics(tmp_path / "run")
    assert [e["step"] for e in steps] == list(range(1, 41))
    for key in ("loss", "grad_norm", "lr"):
        assert [e[key] for e in steps] == [e[key] for e in ref_steps], key
    assert [(e["step"], e["val_loss"]) for e in evals] == [(e["step"], e["val_loss"]) for e in ref_evals]


def test_sample_cli(cli, config_file: Path, tmp_path: Path) -> None:
    assert run_train(cli, config_file, tmp_path / "run")[0] == 0
    code, out, err = cli(
        "sample", tmp_path / "run", "--prompt", "ROMEO:", "--max-new-tokens", "50", "--temperature", "0"
    )
    assert code == 0, err
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 50 + 1
    assert (
        cli("sample", tmp_path / "run", "--prompt", "ROMEO:", "--max-new-tokens", "50", "--temperature", "0")[
            1
        ]
        == out
    )
    code, out, _ = cli(
        "sample", tmp_path / "run", "--max-new-tokens", "20", "--num-samples", "2", "--top-p", "0.9"
    )
    assert code == 0 and out.count("---------------") == 1
    code, _, err = cli("sample", tmp_path / "run", "--prompt", "日本")
    assert code == 1 and "cannot represent" in err


def resume_run(config_file: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lmforge", "train", str(config_file), "--out", str(run), "--resume"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_exact_resume(cli, config_file: Path, tmp_path: Path, how: str) -> None:
    longer = ["model.dropout=0.1", "train.max_steps=150"]  # dropout: the RNG state must resume too
    assert run_train(cli, config_file, tmp_path / "reference", *longer)[0] == 0
    run = tmp_path / "interrupted"
    args = ["train", config_file, "--out", run]
    for item in [*TINY, *longer]:
        args += ["--set", item]
    process = lmforge(*args)
    wait_for_step(run, 25, process)
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=60)
    if how in ("SIGTERM", "SIGINT"):  # Ctrl-C: exit 130
        assert process.returncode == 128 + getattr(signal, how)
        assert f"{how} at step" in err and "continue with" in err
        stopped_at = int(err.split(f"{how} at step ")[1].split(";")[0])
        assert 25 <= stopped_at < 150
        assert max(c.step for c in ckpt.list_checkpoints(run)) == stopped_at  # saved on the signal
    else:
        assert process.returncode == -signal.SIGKILL
    resumed = resume_run(config_file, run, *longer)
    assert resumed.returncode == 0, resumed.stderr
    ref_steps, ref_evals = read_metrics(tmp_path / "reference")
    steps, evals = read_metrics(run)
    assert [e["step"] for e in steps] == list(range(1, 151))
    for key in ("loss", "grad_norm", "lr"):  # bit-identical on CPU in fp32
        assert [e[key] for e in steps] == [e[key] for e in ref_steps], key
    assert [(e["step"], e["val_loss"]) for e in evals] == [(e["step"], e["val_loss"]) for e in ref_evals]


DYING_SAVE = """
import os, signal, sys, torch
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    calls.append(f)
    real_save(obj, f, *args, **kwargs)
    if len(calls) == 2:  # the second checkpoint: killed after writing part of it
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save  # what lmforge.checkpoint.folder calls to write state.pt
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous_checkpoint(
    cli, config_file: Path, tmp_path: Path
) -> None:
    assert run_train(cli, config_file, tmp_path / "reference")[0] == 0
    run = tmp_path / "run"
    args = [sys.executable, "-c", DYING_SAVE, "train", str(config_file), "--out", str(run)]
    for item in TINY:
        args += ["--set", item]
    killed = subprocess.run(args, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = ckpt.list_checkpoints(run)
    assert [c.step for c in checkpoints] == [10]  # the half-written step 20 never appeared
    assert list((run / "checkpoints").glob(".tmp-*"))  # its staging folder is what was left
    ckpt.verify_checkpoint(checkpoints[0].path)
    resumed = resume_run(config_file, run)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert [e["loss"] for e in read_metrics(run)[0]] == [
        e["loss"] for e in read_metrics(tmp_path / "reference")[0]
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.block_size=100000"], "model.block_size 100000 is larger than the train split"),
        (["model.vocab_size=10"], "model.vocab_size 10 is smaller than the data's vocabulary (59, tokenizer"),
        (["data.dir=/nonexistent/data"], "/nonexistent/data: not a prepared data folder"),
        (["model.n_head=3"], "model.d_model (32) must be divisible by model.n_head (3)"),
        (["train.max_stepz=3"], "unknown key train.max_stepz"),
        (["train.dtype=fp16"], "train.dtype fp16 needs CUDA"),
    ],
)
def test_bad_training_input(cli, config_file: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    code, _, err = run_train(cli, config_file, tmp_path / "run", *extra)
    assert code == 1
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_run_dir_protection_and_resume_errors(cli, config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, err = run_train(cli, config_file, run)
    assert code == 0, err
    before = (run / "metrics.jsonl").read_bytes()
    code, _, err = run_train(cli, config_file, run)
    assert code == 1 and "exists and is not empty; pass --resume to continue that run or --overwrite" in err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert json.loads((run / ".lmforge").read_text())["kind"] == "run"  # what lets --overwrite replace it
    code, _, err = cli("train", config_file, "--out", tmp_path / "fresh", "--resume")
    assert code == 1 and "--resume: no checkpoint in" in err
    # Another architecture cannot resume this run.
    code, _, err = cli(
        "train",
        config_file,
        "--out",
        run,
        "--resume",
        *sum((["--set", s] for s in TINY), []),
        "--set",
        "model.n_layer=3",
    )
    assert (
        code == 1
        and "checkpoint of another architecture (model.n_layer: 2 in the checkpoint, 3 in the config)" in err
    )
    # A truncated checkpoint is detected, not loaded; with no intact one to fall back to, resume stops.
    for c in ckpt.list_checkpoints(run):
        weights = c.path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    last = ckpt.list_checkpoints(run)[-1].path
    code, _, err = cli("train", "--out", run, "--resume")
    assert code == 1 and err.count("\n") == 1
    assert f"{last}: corrupted checkpoint (model.safetensors does not match its sha256" in err
    assert "the 1 older checkpoint(s) do not verify either" in err
    code, _, err = cli("sample", last)
    assert code == 1 and "corrupted checkpoint" in err
    # --overwrite starts over in a new folder: what was added to the run folder goes with it.
    (run / "scratch.txt").write_text("left in lmforge's run folder")
    code, _, err = cli(
        "train", config_file, "--out", run, "--overwrite", *sum((["--set", s] for s in TINY), [])
    )
    assert code == 0, err
    assert not (run / "scratch.txt").exists() and (run / ".lmforge").is_file()


def test_data_with_another_tokenizer_is_refused(
    cli, config_file: Path, char_data: Path, tmp_path: Path
) -> None:
    assert run_train(cli, config_file, tmp_path / "run")[0] == 0
    (tmp_path / "other.txt").write_text("completely different text, other characters: XYZ 123\n" * 200)
    code, _, err = cli(
        "prepare", tmp_path / "other.txt", "--tokenizer", "char", "--out", tmp_path / "other", "-q"
    )
    assert code == 0, err
    code, _, err = cli("eval", tmp_path / "run", "--data", tmp_path / "other")
    assert code == 1 and "its tokenizer differs from the one of checkpoint" in err
    code, _, err = cli(
        "train",
        "--out",
        tmp_path / "run",
        "--resume",
        "--set",
        f"data.dir={tmp_path / 'other'}",
        "--set",
        "train.max_steps=50",
    )
    assert code == 1 and "its tokenizer differs" in err


def test_nan_loss_stops_without_saving_over_a_good_checkpoint(config_file: Path, tmp_path: Path) -> None:
    config = load_config(
        config_file,
        [
            *TINY,
            "optim.name=sgd",
            "optim.lr=1e12",
            "schedule.min_lr=0",
            "optim.grad_clip=0",
            "schedule.warmup_steps=0",
            "train.checkpoint_interval=1",
        ],
    )
    with pytest.raises(
        LmforgeError, match=r"loss is (nan|inf) .* at step (\d+); stopped without saving"
    ) as info:
        train(config, tmp_path / "run")
    for c in ckpt.list_checkpoints(tmp_path / "run"):
        model = load(c.path, "last", "cpu").model
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "the last good checkpoint is" in str(info.value)


def test_on_nan_skip_skips_the_batch(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.nn.functional as F

    from lmforge.model import gpt

    calls = {"n": 0}
    real = F.cross_entropy

    def poisoned(*args, **kwargs):  # the loss of the 3rd training step is NaN
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(gpt.F, "cross_entropy", poisoned)
    config = load_config(
        config_file, [*TINY, "train.on_nan=skip", "train.max_steps=5", "train.eval_interval=0"]
    )
    summary = train(config, tmp_path / "run")
    steps, _ = read_metrics(tmp_path / "run")
    assert [e.get("skipped", False) for e in steps] == [False, False, True, False, False]
    assert summary.steps == 5 and math.isfinite(summary.final_eval.loss)


def test_on_nan_skip_stops_after_ten_skipped_batches_in_a_row(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.nn.functional as F

    from lmforge.model import gpt

    calls = {"n": 0}
    real = F.cross_entropy

    def poisoned(*args, **kwargs):  # every training loss from the 3rd step on is NaN
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(gpt.F, "cross_entropy", poisoned)
    config = load_config(
        config_file, [*TINY, "train.on_nan=skip", "train.max_steps=30", "train.eval_interval=0"]
    )
    with pytest.raises(LmforgeError, match=r"^10 non-finite losses in a row up to step 12; stopping$"):
        train(config, tmp_path / "run")
    steps, _ = read_metrics(tmp_path / "run")
    assert [e.get("skipped", False) for e in steps] == [False, False] + [True] * 9  # the 10th stops


def test_bf16_autocast_trains(config_file: Path, tmp_path: Path) -> None:
    config = load_config(config_file, [*TINY, "train.dtype=bf16", "train.max_steps=20"])
    summary = train(config, tmp_path / "run")
    steps, evals = read_metrics(tmp_path / "run")
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5 and math.isfinite(summary.final_eval.loss)


def accumulated(x: torch.Tensor, y: torch.Tensor, accum: int) -> tuple[float, float, int, list[torch.Tensor]]:
    """Loss, grad norm, tokens and gradients of one update over (x, y) in `accum` equal micro-batches."""
    import contextlib

    from lmforge.config import ModelConfig
    from lmforge.model import GPT
    from lmforge.train.step import Stepper, StepSettings

    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=16, vocab_size=30))
    stepper = Stepper(
        model,
        [torch.optim.SGD(model.parameters(), lr=0.1)],
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        amp=contextlib.nullcontext(),
        device=torch.device("cpu"),
        settings=StepSettings(grad_accum_steps=accum, grad_clip=0.0),
    )
    done = stepper.gradients(iter(zip(x.chunk(accum), y.chunk(accum), strict=True)))
    return done.loss, done.grad_norm, done.tokens, [p.grad.clone() for p in model.parameters()]


def test_grad_accumulation_matches_a_bigger_batch() -> None:
    """Two micro-batches of 4 give the gradient and loss of one batch of 8 (equal-length windows)."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 30, (8, 16)), torch.randint(0, 30, (8, 16))
    (loss1, norm1, tokens1, grads1), (loss2, norm2, tokens2, grads2) = (accumulated(x, y, n) for n in (1, 2))
    assert tokens1 == tokens2 == 128
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads1, grads2))


def test_grad_accumulation_of_padded_batches_weighs_every_target_alike() -> None:
    """Fine-tuning micro-batches score different numbers of targets (padding, masked prompts): the
    update is the mean over every target of the bigger batch, not the mean of the micro-batches' means."""
    from lmforge.targets import IGNORE_INDEX

    torch.manual_seed(0)
    x, y = torch.randint(0, 30, (8, 16)), torch.randint(0, 30, (8, 16))
    y[:4, 2:] = IGNORE_INDEX  # the first micro-batch: 8 targets; the second: 64
    (loss1, norm1, _, grads1), (loss2, norm2, _, grads2) = (accumulated(x, y, n) for n in (1, 2))
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads1, grads2))


@pytest.mark.slow
def test_compile_trains(config_file: Path, tmp_path: Path) -> None:
    config = load_config(
        config_file, [*TINY, "train.compile=true", "train.max_steps=8", "train.eval_interval=0"]
    )
    summary = train(config, tmp_path / "run")
    steps, _ = read_metrics(tmp_path / "run")
    assert summary.steps == 8 and steps[-1]["loss"] < steps[0]["loss"]


def test_stop_at_val_loss_ends_the_run_early(config_file: Path, tmp_path: Path) -> None:
    config = load_config(config_file, [*TINY, "train.max_steps=200", "train.stop_at_val_loss=3.0"])
    summary = train(config, tmp_path / "run")
    _, evals = read_metrics(tmp_path / "run")
    assert summary.steps < 200 and evals[-1]["val_loss"] <= 3.0
    assert all(e["val_loss"] > 3.0 for e in evals[:-1])  # it stopped at the first eval that reached it
    assert (
        summary.steps == evals[-1]["step"]
        and ckpt.list_checkpoints(tmp_path / "run")[-1].step == summary.steps
    )


def test_resume_of_a_run_that_reached_its_target_val_loss_has_nothing_to_do(
    cli, config_file: Path, tmp_path: Path
) -> None:
    """A run that stopped at train.stop_at_val_loss is finished (`lmforge runs` says so): resumed
    with that target it trains nothing and writes nothing; with a lower one it trains on."""
    run = tmp_path / "run"
    sets = [*TINY, "train.max_steps=200", "train.stop_at_val_loss=3.0", "log.progress=false"]
    code, _, err = cli("train", config_file, "--out", run, *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    steps = ckpt.list_checkpoints(run)[-1].step
    before = snapshot(run)
    code, out, err = cli("train", "--out", run, "--resume")
    assert code == 0 and snapshot(run) == before, err
    assert f"<= train.stop_at_val_loss (3) at step {steps}: lower or unset it to train on" in out
    code, _, err = cli("train", "--out", run, "--resume", "--set", "train.stop_at_val_loss=0.1")
    assert code == 0 and ckpt.list_checkpoints(run)[-1].step > steps, err


def test_speedrun_recipe_loads_and_trains(char_data: Path, tmp_path: Path) -> None:
    configs = RECIPES_DIR
    config = load_config(
        configs / "speedrun-shakespeare-char-cpu.toml",
        [f"data.dir={char_data}", "train.max_steps=6", "log.progress=false", "train.eval_interval=3"],
    )
    assert config.optim.name == "muon" and config.model.zero_init_residual and config.train.dtype == "auto"
    summary = train(config, tmp_path / "run")
    steps, evals = read_metrics(tmp_path / "run")
    assert summary.steps == 6 and evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(59) + 0.1


def test_overwrite_refuses_a_folder_of_user_files(cli, config_file: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "config.toml").write_text("# a config of mine, not a run\n")
    before = snapshot(mine)
    code, _, err = run_train(cli, config_file, mine, "train.max_steps=2")
    assert code == 1 and "pass --resume to continue that run or --overwrite" in err
    code, _, err = cli(
        "train", config_file, "--out", mine, "--overwrite", *sum((["--set", s] for s in TINY), [])
    )
    assert code == 1 and "was not written by lmforge" in err and err.count("\n") == 1
    assert snapshot(mine) == before


def test_overwrite_never_replaces_a_folder_that_holds_the_runs_data(
    cli, char_data: Path, tmp_path: Path
) -> None:
    old_run = tmp_path / "old-run"  # a run folder of an older lmforge (no marker): lmforge's to replace...
    (old_run / "checkpoints").mkdir(parents=True)
    (old_run / "config.toml").write_text("")
    code, _, err = cli(
        "prepare", char_data.parent / "text.txt", "--tokenizer", "char", "--out", old_run / "data", "-q"
    )
    assert code == 0, err
    before = snapshot(old_run)
    sets = sum((["--set", s] for s in [*TINY, f"data.dir={old_run / 'data'}"]), [])
    code, _, err = cli("train", "--out", old_run, "--overwrite", *sets)  # ...but not with its data inside
    assert code == 1 and "contains the input" in err and err.count("\n") == 1
    assert snapshot(old_run) == before


def test_resuming_a_run_from_before_markers_marks_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    prepare_run_dir(run, Config(), tmp_path / "tokenizer.json", resumed_at=10)
    assert json.loads((run / ".lmforge").read_text())["kind"] == "run"
    assert (run / "checkpoints").is_dir()  # a resume keeps the folder


def test_build_run_resolves_a_copy_of_the_config_and_leaves_the_callers_as_it_was(
    char_data: Path, tmp_path: Path
) -> None:
    """The run's config holds what build_run resolved (the dtype "auto" chose, the data's vocabulary,
    train.init_from's architecture); the config it was given compares equal to a copy taken before."""
    import copy

    from lmforge.config import ModelConfig
    from lmforge.model import GPT
    from lmforge.runtime import resolve_dtype
    from lmforge.train.distributed import Distributed
    from lmforge.train.run import build_run

    cpu = torch.device("cpu")
    source = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=32, vocab_size=64)
    ckpt.save_checkpoint(
        tmp_path / "source",
        1,
        GPT(source),
        state={},
        config=Config(model=source),
        tokenizer_file=char_data / "tokenizer.json",
        val_loss=None,
    )
    for init_from, architecture in (("", 2), (str(tmp_path / "source"), 1)):
        config = load_config(None, [*TINY, f"data.dir={char_data}", f"train.init_from={init_from}"])
        before = copy.deepcopy(config)
        assert config.model.vocab_size is None and config.train.dtype == "auto"
        run = build_run(config, tmp_path / f"run{architecture}", dist=Distributed(), device=cpu)
        assert config == before
        assert run.config.train.dtype == resolve_dtype("auto", cpu)
        assert run.config.model.n_layer == architecture
        assert run.config.model.vocab_size == (64 if init_from else 59)  # the source's, else the data's
        assert load_config(tmp_path / f"run{architecture}" / "config.toml") == run.config  # as saved


SHORT = ["train.max_steps=4", "train.eval_interval=2", "train.checkpoint_interval=2"]


def test_resume_with_another_optimizer_is_refused_and_leaves_the_run_as_it_was(
    cli, config_file: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert run_train(cli, config_file, run, *SHORT)[0] == 0
    before = snapshot(run)
    for optimizer in ("sgd", "muon"):
        more = ["--set", "train.max_steps=6", "--set", f"optim.name={optimizer}"]
        code, _, err = cli("train", "--out", run, "--resume", *more)
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert f"optim.name: 'adamw' in the checkpoint, {optimizer!r} in the config" in err
        assert snapshot(run) == before  # the run's config.toml still names AdamW
    code, _, err = cli("train", "--out", run, "--resume", "--set", "train.max_steps=6")
    assert code == 0, err


def test_resume_at_or_past_max_steps_has_nothing_to_do_and_writes_nothing(
    cli, config_file: Path, tmp_path: Path
) -> None:
    """train.max_steps is the run's total: a resume whose max_steps the run has reached (or passed)
    trains nothing, says so, exits 0 as HF Trainer and litgpt do, and leaves every file as it was
    (its config.toml still holds the max_steps it trained to)."""
    run = tmp_path / "run"
    assert run_train(cli, config_file, run, *SHORT, "log.tensorboard=true")[0] == 0
    before = snapshot(run)
    for max_steps in (2, 4):
        code, out, err = cli("train", "--out", run, "--resume", "--set", f"train.max_steps={max_steps}")
        assert code == 0, err
        assert snapshot(run) == before, max_steps
        assert f"nothing to do: the run has done 4 steps (train.max_steps = {max_steps})" in out
        assert "done: 4 steps" in out
    code, _, err = cli("train", "--out", run, "--resume", "--set", "train.max_steps=6")
    assert code == 0, err
    assert load_config(run / "config.toml").train.max_steps == 6


def test_a_resumed_run_trains_with_the_optimizer_settings_of_its_config(
    cli, config_file: Path, tmp_path: Path
) -> None:
    """The hyperparameters a checkpoint's optimizer state carries give way to the config's, which the
    run logs and saves: a resume with another peak lr or weight decay trains with them."""
    from lmforge.train.distributed import Distributed
    from lmforge.train.run import build_run

    run = tmp_path / "run"
    assert run_train(cli, config_file, run, *SHORT)[0] == 0
    changed = [
        "optim.lr=1e-4",
        "schedule.min_lr=1e-5",
        "optim.weight_decay=0.01",
        "optim.betas=[0.8,0.9]",
        "optim.eps=1e-6",
    ]
    config = load_config(run / "config.toml", ["train.max_steps=6", *changed])
    resumed = build_run(config, run, dist=Distributed(), device=torch.device("cpu"), resume=True)
    assert resumed.progress.step == 4
    (adamw,) = resumed.state.optimizers
    assert adamw.state  # the moments came from the checkpoint
    assert {g["initial_lr"] for g in adamw.param_groups} == {1e-4}
    assert {g["betas"] for g in adamw.param_groups} == {(0.8, 0.9)}
    assert {g["eps"] for g in adamw.param_groups} == {1e-6}
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0, 0.0]  # matrices only
