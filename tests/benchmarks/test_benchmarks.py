"""The benchmark scripts run end to end on tiny settings and print/write what they promise."""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.model import GPT
from tests.conftest import DATASETS, TINY

# a benchmark run by the tests reads the named datasets they read: the small copies, pinned to themselves,
# where the shared ones are missing (tests/fixtures/pinned.py)
PINNED = [] if DATASETS.real else [str(Path(__file__).parents[1] / "fixtures" / "pinned.py")]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_throughput_modes_and_sweep_with_plot(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[model]\nn_layer = 1\nn_head = 1\nd_model = 32\nblock_size = 16\n[train]\nbatch_size = 2\n"
    )
    run = [
        sys.executable,
        str(BENCHMARKS / "throughput.py"),
        "--config",
        str(config),
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    modes = subprocess.run(
        [*run, "--modes", "fp32", "bf16"], capture_output=True, text=True, check=True
    ).stdout
    assert "fp32" in modes and "bf16 / fp32 speed:" in modes and "tok/s" in modes
    assert "fraction of measured matmul peak" in modes and "MFU" not in modes  # a CPU: no datasheet peak
    sweep = subprocess.run(
        [
            *run,
            "--sweep",
            "--d-models",
            "32",
            "64",
            "--blocks",
            "8",
            "16",
            "--tokens-per-step",
            "32",
            "--table",
            str(tmp_path / "sweep.jsonl"),
            "--plot",
            str(tmp_path / "sweep.png"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [(r["d_model"], r["block_size"]) for r in rows] == [(32, 8), (64, 8), (32, 16), (64, 16)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["matmul_peak_fraction"] <= 1 for r in rows)
    assert all(r["peak_flops"] > 0 and r["peak_measured"] for r in rows)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written" in sweep


def load_benchmark(name: str) -> types.ModuleType:
    """A benchmark script as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_estimate_and_the_throughput_benchmark_count_the_same_flops_per_token(
    char_data: Path, tmp_path: Path
) -> None:
    """One formula for all three (`GPT.training_flops`): one that counted its own way would differ."""
    from lmforge.config import load_config
    from lmforge.train.distributed import Distributed
    from lmforge.train.estimate import estimate
    from lmforge.train.run import build_run
    from lmforge.train.step import NonFiniteGuard
    from lmforge.train.trainer import train_step

    overrides = [*TINY, "model.vocab_size=64", f"data.dir={char_data}"]
    (tmp_path / "tiny.toml").write_text("")
    benchmark = load_benchmark("throughput").measure(tmp_path / "tiny.toml", overrides, steps=1, warmup=0)
    run = build_run(
        load_config(None, overrides), tmp_path / "run", dist=Distributed(), device=torch.device("cpu")
    )
    trained = train_step(run, NonFiniteGuard("stop", False))
    estimated = estimate(load_config(None, overrides), peak_flops=1e12).params.flops_per_token
    assert benchmark["flops_per_token"] == trained.flops / trained.tokens == estimated
    m = run.config.model  # and it is the causal count: 6·L·d·T for attention, not PaLM's 12
    assert estimated - GPT(dataclasses.replace(m, attention="bidirectional")).flops_per_token() == (
        -6 * m.n_layer * m.d_model * m.block_size
    )


@pytest.mark.slow
def test_speedrun_gives_every_run_one_schedule_and_reruns_bf16_in_fp32(
    char_data: Path, tmp_path: Path
) -> None:
    # The two configs ask for different eval and checkpoint schedules; the script overrides both alike.
    slow, fast = tmp_path / "slow.toml", tmp_path / "fast.toml"
    slow.write_text(
        '[optim]\nlr = 1e-3\n[train]\ndtype = "fp32"\neval_interval = 10\ncheckpoint_interval = 10\n'
        "eval_batch_size = 16\n"
    )
    fast.write_text('[optim]\nlr = 3e-3\n[train]\ndtype = "bf16"\neval_interval = 0\n')
    schedule_keys = ("optim.lr", "train.eval_interval", "train.checkpoint_interval", "train.eval_batch_size")
    overrides = sum((["--set", item] for item in TINY if not item.startswith(schedule_keys)), [])
    command = [
        sys.executable,
        str(BENCHMARKS / "speedrun.py"),
        "--configs",
        str(slow),
        str(fast),
        "--target",
        "3.5",
        "--data",
        str(char_data),
        "--json",
        str(tmp_path / "speedrun.json"),
    ]
    result = subprocess.run([*command, *overrides], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPU ") and "native bf16:" in lines[0]
    assert lines[1].startswith("slow.toml (fp32): reached val loss")
    assert lines[2].startswith("fast.toml (bf16): reached") and lines[3].startswith(
        "fast.toml (fp32): reached"
    )
    assert lines[4].startswith("ratio fast.toml (bf16) / slow.toml (fp32):")
    assert lines[5].startswith("ratio fast.toml (fp32) / slow.toml (fp32):")
    assert lines[6].startswith("bf16 alone: fast.toml runs") and "faster in bf16 than in fp32" in lines[6]
    record = json.loads((tmp_path / "speedrun.json").read_text())
    assert record["machine"]["capability"] and isinstance(record["machine"]["native_bf16"], bool)
    runs = record["results"]
    assert [(r["config"], r["dtype"]) for r in runs] == [
        ("slow.toml", "fp32"),
        ("fast.toml", "bf16"),
        ("fast.toml", "fp32"),
    ]
    same = {"train.eval_interval": 0, "train.checkpoint_interval": 0, "train.eval_batch_size": 128}
    assert all(r["schedule"] == same for r in runs)
    assert all([step for step, _ in r["evals"]] == [40] for r in runs)  # one eval, at the end
    assert [c["ratio"] for c in record["ratios"]] == [r["wall_s"] / runs[0]["wall_s"] for r in runs[1:]]
    [gain] = record["precision_gains"]
    assert gain["config"] == "fast.toml" and gain["speedup"] == runs[2]["wall_s"] / runs[1]["wall_s"]

    refused = subprocess.run([*command, "--set", "train.eval_interval=5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "every run gets the same schedule" in refused.stderr


@pytest.mark.slow
def test_speedrun_tune_holds_out_the_end_of_train_and_never_reads_val(
    char_data: Path, tmp_path: Path
) -> None:
    data, split = tmp_path / "data", tmp_path / "tune"
    shutil.copytree(char_data, data)
    (data / "val.bin").write_bytes(b"")  # unreadable as a split: a run that opened it would fail
    config = tmp_path / "tiny.toml"
    config.write_text("[optim]\nlr = 3e-3\n[train]\nmax_steps = 4\n")
    tries = ["model.n_layer=2 model.n_head=2 model.d_model=32 model.block_size=32 train.batch_size=8"]
    tries.append(tries[0] + " train.max_steps=2")
    command = [sys.executable, str(BENCHMARKS / "speedrun_tune.py"), "--config", str(config)]
    command += ["--data", str(data), "--tune-tokens", "5000", "--split-dir", str(split), "--jobs", "2"]
    command += sum((["--try", t] for t in tries), [])
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train = np.fromfile(char_data / "train.bin", dtype=np.uint16)
    assert np.array_equal(np.fromfile(split / "train.bin", dtype=np.uint16), train[:-5000])
    assert np.array_equal(np.fromfile(split / "val.bin", dtype=np.uint16), train[-5000:])
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"tuning split {split}")
    assert lines[1].startswith("tuning loss ") and "at step 4 " in lines[1] and lines[1].endswith(tries[0])
    assert "at step 2 " in lines[2] and lines[2].endswith("train.max_steps=2")


@pytest.mark.slow
def test_activation_checkpointing_benchmark_prints_both_modes() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "activation_checkpointing.py"),
            "--n-layer",
            "2",
            "--d-model",
            "32",
            "--n-head",
            "2",
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "activation checkpointing off: peak memory of a step" in out
    assert "activation checkpointing on : peak memory of a step" in out and "saving:" in out


@pytest.mark.slow
def test_memory_estimate_within_20_percent_of_measured_peak() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "estimate_memory.py"), "--only", "tiny", "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["checkpointing"] for r in rows] == [False, True]
    for r in rows:  # the bar: within 20% of the measured peak
        assert 0.8 <= r["ratio"] <= 1.2, r
        assert r["measured"] > r["baseline"] > 0


@pytest.mark.slow
def test_serve_benchmark_compares_lmforge_serve_with_transformers(tmp_path: Path) -> None:
    toy = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--block-size", "32"]
    # 2 streams at most: the server decodes 2 rows, so --compile builds 2 graphs (a few seconds each)
    lengths = ["--prompt-tokens", "4", "--new-tokens", "6", "--requests", "1", "--streams", "1", "2"]
    lengths += ["--rounds", "2", "--threads", "1"]
    # torch's own compile cache, as the other compiling tests use: a machine that ran the suite before
    # finds the graphs (25 s of inductor's C++ builds here); what is checked needs no first start
    lengths += ["--compile-cache", "shared"]
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "serve.py"),
            *toy,
            *lengths,
            "--json",
            str(tmp_path / "serve.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CPU ") and "AVX-512:" in result.stdout and "load" in result.stdout
    for variant in ("eager", "compiled"):
        assert f"{variant} / transformers at 1 stream:" in result.stdout
        assert f"{variant} 2 streams / 1:" in result.stdout
    assert "2 rounds, CPU threads: lmforge serve 1, transformers 1" in result.stdout
    record = json.loads((tmp_path / "serve.json").read_text())
    assert record["threads"] == {"lmforge": 1, "transformers": 1} and record["compile_cache"] == "shared"
    for variant in ("eager", "compiled"):
        ours = record[variant]
        for mine, theirs in zip(ours["rounds"]["2"], record["transformers"]["2"], strict=True):
            assert mine["tokens"] == theirs["tokens"] == 12  # same lengths, in every round
        assert len(ours["single_stream_ratios"]) == len(ours["scaling"]) == 2
        assert (
            all(t > 0 for r in ours["rounds"]["1"] for t in r["ttfts_ms"])
            and ours["greedy_identical"] is True
        )


@pytest.mark.slow
def test_sst2_ensemble_scores_each_run_as_eval_does_and_every_ensemble(cli, tmp_path: Path) -> None:
    from lmforge.data.tokenizer import EOT, char_tokenizer
    from tests.tasks.conftest import TEXT, write

    reviews = [("a fine film", 1), ("dull and long", 0), ("a joy", 1), ("bad", 0)]
    write(tmp_path / "sst2", [{"prompt": f"Review: {text}\nSentiment:",
                               "completion": " positive" if label else " negative", "label": label}
                              for text, label in reviews])  # fmt: skip
    char_tokenizer(TEXT, specials=[EOT]).save(str(tmp_path / "tok.json"))
    accuracies = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        settings = [*TINY, "model.block_size=64", "train.max_steps=60", "optim.lr=1e-2", f"train.seed={seed}",
                    f"data.dir={tmp_path / 'sst2'}", f"data.tokenizer={tmp_path / 'tok.json'}"]  # fmt: skip
        assert cli("finetune", "--out", run, *sum((["--set", s] for s in settings), []))[0] == 0
        code, out, err = cli("eval", run, "--task", "sst2", "--checkpoint", "best", "--json")
        assert code == 0, err
        accuracies.append(json.loads(out)["model"]["accuracy"])
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sst2_ensemble.py"), str(tmp_path / "run1"), str(tmp_path / "run2"),
         "--data", str(tmp_path / "sst2"), "--average-weights"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("4 examples") and len(lines) == 5
    for line, accuracy in zip(lines[1:3], accuracies):
        assert float(line.rsplit(" ", 1)[1].rstrip("%")) == pytest.approx(100 * accuracy, abs=0.01)
    assert lines[3].startswith(f"{tmp_path / 'run1'} + {tmp_path / 'run2'}: ")
    assert lines[4].startswith("weights averaged over ")


def test_checkpoint_averaging_means_every_weight_the_tied_embedding_once(tmp_path: Path) -> None:
    from lmforge import checkpoint as ckpt
    from lmforge.config import Config, ModelConfig
    from lmforge.data.tokenizer import EOT, char_tokenizer
    from lmforge.model.gpt import GPT

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from sst2_ensemble import weight_average
    finally:
        sys.path.remove(str(BENCHMARKS))
    char_tokenizer("abc", specials=[EOT]).save(str(tmp_path / "tokenizer.json"))
    config = ModelConfig(n_layer=1, n_head=1, d_model=16, block_size=8, vocab_size=4, tie_embeddings=True)
    models, paths = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(GPT(config))
        saved = Config(model=config)
        tokenizer_file = tmp_path / "tokenizer.json"
        run = tmp_path / f"run{seed}"
        paths.append(
            ckpt.save_checkpoint(
                run, 1, models[-1], state={}, config=saved, tokenizer_file=tokenizer_file, val_loss=1.0
            )
        )
    averaged, _ = weight_average(paths)
    assert averaged.head.weight is averaged.embed.weight  # still tied
    for name, weight in averaged.state_dict().items():
        expected = (models[0].state_dict()[name] + models[1].state_dict()[name]) / 2
        assert torch.allclose(weight, expected), name


def test_sst2_detokenize_writes_reviews_as_prose(tmp_path: Path) -> None:
    source = tmp_path / "sst2"
    source.mkdir()
    reviews = {
        "it 's a charming journey . ": "It's a charming journey.",
        "i do n't know ... ": "I don't know...",
        "`` the movie '' ( 2002 ) costs $ 5 , really ?": '"the movie" (2002) costs $5, really?',
        "sense of ` there but for the grace , ' it is": "Sense of 'there but for the grace,' it is",
    }
    for split in ("train", "val", "eval"):
        lines = [json.dumps({"prompt": f"Review: {text.strip()}\nSentiment:"}) + "\n" for text in reviews]
        (source / f"{split}.jsonl").write_text("".join(lines))
    script = BENCHMARKS / "sst2_detokenize.py"
    subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "out")], check=True)
    written = [json.loads(line)["prompt"] for line in (tmp_path / "out" / "eval.jsonl").open()]
    assert written == [f"Review: {prose}\nSentiment:" for prose in reviews.values()]
    again = subprocess.run(
        [sys.executable, str(script), str(source), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert again.returncode == 2 and f"{tmp_path / 'out'} exists" in again.stderr.splitlines()[-1]


@pytest.mark.slow
def test_packing_benchmark_reports_both_sets_and_both_modes(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "packing.json"
    tiny = ["--examples", "60", "--seconds", "0.2", "--warmup", "1", "--repeats", "1", "--n-layer", "1"]
    tiny += [
        "--d-model",
        "32",
        "--n-head",
        "2",
        "--block-size",
        "64",
        "--vocab-size",
        "300",
        "--batch-size",
        "4",
    ]
    printed = subprocess.run(
        [sys.executable, *PINNED, str(BENCHMARKS / "packing.py"), *tiny, "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "sst2:" in printed and "instruct:" in printed and "real tokens/s" in printed
    results = {r["set"]: r for r in json.loads(out.read_text())["results"]}
    for result in results.values():
        assert result["packed"]["real_tokens"] > 0 and result["unpacked"]["real_tokens"] > 0
    assert results["sst2"]["packed"]["fill"] > results["sst2"]["unpacked"]["fill"]  # short examples fill rows
    assert (
        results["instruct"]["summary"].startswith("fine-tuning data:")
        and "(alpaca)" in results["instruct"]["summary"]
    )


@pytest.mark.slow
def test_gpu_check_dry_run_exercises_every_step_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable}  # LMFORGE_DATA_DIR: the fixtures' copies (conftest)
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--tiny", "--train-seconds", "240", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "GPU: no CUDA device" in summary
    assert "1. training step: fp32" in summary and "tok/s" in summary
    # `lmforge serve` as it is; --tiny leaves out --compile (its graphs cost ~25 s to build here, and
    # the serve benchmark's own test runs it at this size)
    assert "eager / transformers at 1 stream:" in summary and "eager 8 streams / 1:" in summary
    assert "eager: first request's greedy text identical to transformers': yes" in summary
    assert "compiled / transformers" not in summary
    train = next(line for line in summary.splitlines() if line.startswith("3. train on"))
    # 6 steps, or fewer where a loaded machine runs past the time limit (exit 124, stopped by SIGTERM)
    assert ("(exit 0;" in train and "6 steps" in train) or "(exit 124;" in train
    assert "tokens/s" in train
    served = json.loads((out / "serve.json").read_text())
    assert served["eager"]["greedy_identical"] is True and "compiled" not in served


def test_gpu_check_refuses_without_a_gpu_unless_tiny(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full check would run")
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert result.returncode == 1
    assert "no CUDA device here: nothing measured" in (tmp_path / "o" / "summary.txt").read_text()
