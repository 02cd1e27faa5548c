"""Data-parallel training on CPU with gloo: real `torchrun` launches of 2 processes against one process.

The global batch is the same at every world size, so per-step losses must agree with a
single process to float rounding (fp32, dropout 0), and checkpoints must resume at another
world size with the same subsequent losses.
"""

from __future__ import annotations

import copy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import ModelConfig, load_config
from lmforge.data import prepare
from lmforge.errors import LmforgeError
from lmforge.inference import load
from lmforge.model.gpt import GPT
from lmforge.targets import IGNORE_INDEX
from lmforge.train.distributed import Distributed, apply_activation_checkpointing
from lmforge.train.run import build_run
from lmforge.train.trainer import train
from tests.conftest import BF16_EPS, PIN_FP32, TINY
from tests.train.conftest import read_metrics

# 8 steps of 2 micro-batches (gradient sync skipped on the first), eval and checkpoint every 4 steps.
SMALL = [
    *TINY,
    PIN_FP32,  # one process against two, to 1e-5
    "train.max_steps=8",
    "train.eval_interval=4",
    "train.checkpoint_interval=4",
    "train.grad_accum_steps=2",
    "train.eval_batch_size=16",
]
TIMEOUT = 300  # seconds for one launch: a hang fails the test instead of blocking the suite


def overrides(*extra: str) -> list[str]:
    return sum((["--set", item] for item in [*SMALL, *extra]), [])


CONSOLE_SCRIPT = Path(sys.executable).parent / "lmforge"


def torchrun(
    *args: object,
    nproc: int = 2,
    launcher: tuple[str, ...] = ("--standalone",),
    wait: bool = True,
    console_script: bool = False,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`torchrun --nproc-per-node N ... -m lmforge ARGS`, or `--no-python lmforge ARGS`, or a script
    when ARGS starts with one."""
    target = [str(a) for a in args]
    if console_script and CONSOLE_SCRIPT.is_file():
        target = ["--no-python", str(CONSOLE_SCRIPT), *target]
    elif not target[0].endswith(".py"):
        target = ["-m", "lmforge", *target]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "--nproc-per-node",
        str(nproc),
        *target,
    ]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


def train_in_process(config_file: Path, out: Path, *extra: str, resume: bool = False) -> None:
    config = load_config(config_file, [*SMALL, *extra])
    train(config, out, resume=resume)


def assert_same_losses(run: Path, reference: Path, tolerance: float = 1e-5) -> None:
    steps, evals = read_metrics(run)
    ref_steps, ref_evals = read_metrics(reference)
    assert [e["step"] for e in steps] == [e["step"] for e in ref_steps] == list(range(1, 9))
    for key in ("loss", "grad_norm"):
        assert [e[key] for e in steps] == pytest.approx([e[key] for e in ref_steps], abs=tolerance), key
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals] == [4, 8]
    assert [e["val_loss"] for e in evals] == pytest.approx([e["val_loss"] for e in ref_evals], abs=tolerance)


def keep_checkpoints_up_to(run: Path, step: int) -> None:
    """Make `run` look stopped at `step` (its later checkpoints gone); --resume continues from there."""
    for c in ckpt.list_checkpoints(run):
        if c.step > step:
            shutil.rmtree(c.path)


@pytest.fixture(scope="module")
def reference(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plain process (parallel.strategy = none) over the same 8 steps."""
    root = tmp_path_factory.mktemp("reference")
    config_file = root / "tiny.toml"
    config_file.write_text(f'[data]\ndir = "{char_data}"\n')
    train_in_process(config_file, root / "run")
    return root / "run"


def config_of(reference: Path) -> Path:
    return reference.parent / "tiny.toml"


@pytest.fixture(scope="module")
def two_process_run(reference: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same 8 steps by 2 processes under torchrun, launched once per strategy for the whole module."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def run(strategy: str) -> tuple[Path, subprocess.CompletedProcess]:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(strategy) / "run"
            runs[strategy] = (
                out,
                torchrun(
                    "train", config_of(reference), "--out", out, *overrides(f"parallel.strategy={strategy}")
                ),
            )
        return runs[strategy]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(reference: Path, two_process_run, strategy: str) -> None:
    run, result = two_process_run(strategy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("done: 8 steps") == 1  # only rank 0 prints
    assert_same_losses(run, reference)
    last = ckpt.list_checkpoints(run)[-1].path
    ckpt.verify_checkpoint(last)  # the DCP shards are covered by meta.json's sha256 too
    assert (last / ckpt.TRAIN_STATE / ".metadata").is_file()
    # model.safetensors is gathered in full: the same tensors as the single process's (to rounding)
    ours = load(last, "last", "cpu").model.state_dict()
    theirs = load(reference, "last", "cpu").model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


@pytest.mark.slow
@pytest.mark.bf16
def test_two_processes_match_one_in_bf16(reference: Path, tmp_path: Path) -> None:
    """The bf16 path: DDP's two half batches round their bf16 matmuls differently from one whole
    batch, so the losses agree to bf16's precision, not fp32's."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_in_process(config_of(reference), one, "train.dtype=bf16")
    result = torchrun(
        "train", config_of(reference), "--out", two, *overrides("train.dtype=bf16", "parallel.strategy=ddp")
    )
    assert result.returncode == 0, result.stderr
    (steps, evals), (ref_steps, ref_evals) = read_metrics(two), read_metrics(one)
    assert [e["step"] for e in steps] == [e["step"] for e in ref_steps] == list(range(1, 9))
    # a mean of bf16-rounded terms: within one unit roundoff of the value (measured: ~1e-4 of ~4.2)
    assert [e["loss"] for e in steps] == pytest.approx([e["loss"] for e in ref_steps], rel=BF16_EPS)
    assert [e["val_loss"] for e in evals] == pytest.approx([e["val_loss"] for e in ref_evals], rel=BF16_EPS)
    # a norm sums squares of bf16-rounded gradients: a few roundoffs (measured: ~2e-3 relative)
    assert [e["grad_norm"] for e in steps] == pytest.approx(
        [e["grad_norm"] for e in ref_steps], rel=4 * BF16_EPS
    )


@pytest.mark.slow
def test_fsdp_saves_an_untied_model_whose_vocabulary_is_not_divisible_by_the_processes(
    reference: Path, tmp_path: Path
) -> None:
    """The char vocabulary (59) splits unevenly over 2 ranks: the gathered embedding and head are views
    into padded buffers, which safetensors refused to save (a traceback at the first checkpoint)."""
    untied = ("model.tie_embeddings=false", "train.max_steps=2", "train.eval_interval=2")
    one, two = tmp_path / "one", tmp_path / "two"
    train_in_process(config_of(reference), one, *untied)
    result = torchrun(
        "train", config_of(reference), "--out", two, *overrides(*untied, "parallel.strategy=fsdp")
    )
    assert result.returncode == 0, result.stderr
    ours, theirs = (load(run, "last", "cpu").model.state_dict() for run in (two, one))
    assert ours["embed.weight"].size(0) % 2 == 1 and "head.weight" in ours  # uneven, and untied
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


@pytest.mark.slow
def test_resume_two_processes_in_one(reference: Path, two_process_run, tmp_path: Path) -> None:
    """FSDP2 at 2 processes saved step 4; one plain process resumes: steps 5-8 as if uninterrupted."""
    source, result = two_process_run("fsdp")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    shutil.copytree(source, run)
    keep_checkpoints_up_to(run, 4)
    assert ckpt.has_sharded_state(ckpt.list_checkpoints(run)[-1].path)
    train_in_process(config_of(reference), run, resume=True)
    assert_same_losses(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [("none", "fsdp"), ("ddp", "ddp")])
def test_resume_one_process_in_two(reference: Path, tmp_path: Path, first: str, then: str) -> None:
    """Step 4 saved by one process (none: the single-process format; ddp: DCP at world size 1),
    resumed by 2 processes: steps 5-8 as if uninterrupted."""
    run = tmp_path / "run"
    if first == "none":
        shutil.copytree(reference, run)
    else:
        train_in_process(config_of(reference), run, f"parallel.strategy={first}")
    assert ckpt.has_sharded_state(ckpt.list_checkpoints(run)[-1].path) == (first != "none")
    keep_checkpoints_up_to(run, 4)
    result = torchrun(
        "train", config_of(reference), "--out", run, "--resume", *overrides(f"parallel.strategy={then}")
    )
    assert result.returncode == 0, result.stderr
    assert_same_losses(run, reference)


def test_plain_sgd_resumes_in_a_data_parallel_run(reference: Path, tmp_path: Path) -> None:
    """SGD without momentum keeps no per-parameter state: a single-process checkpoint of it resumes
    under ddp (DCP's full-state loader found no tensor in such a state and failed an assertion)."""
    plain_sgd = ("optim.name=sgd", "optim.momentum=0")
    uninterrupted, run = tmp_path / "uninterrupted", tmp_path / "run"
    train_in_process(config_of(reference), uninterrupted, *plain_sgd)
    shutil.copytree(uninterrupted, run)
    keep_checkpoints_up_to(run, 4)
    train_in_process(config_of(reference), run, *plain_sgd, "parallel.strategy=ddp", resume=True)
    assert_same_losses(run, uninterrupted)


@pytest.mark.parametrize(("first", "momenta"), [("ddp", (0, 0.9)), ("none", (0.9, 0))])
def test_a_data_parallel_resume_may_change_the_momentum(
    reference: Path, tmp_path: Path, first: str, momenta: tuple[float, float]
) -> None:
    """optim's momenta may change on resume (docs/verbs/train.md): a DCP checkpoint of plain SGD resumed
    with momentum, and a single-process one with momentum resumed under ddp without, continue as a
    single-process resume does (the restored state's shape was the new config's: the one refused
    for a missing momentum buffer, the other failed an assertion)."""
    sgd = "optim.name=sgd"
    before, after = (f"optim.momentum={m}" for m in momenta)
    expected, run = tmp_path / "expected", tmp_path / "run"
    train_in_process(config_of(reference), expected, sgd, before)
    train_in_process(config_of(reference), run, sgd, before, f"parallel.strategy={first}")
    for folder in (expected, run):
        keep_checkpoints_up_to(folder, 4)
    train_in_process(config_of(reference), expected, sgd, after, resume=True)
    train_in_process(config_of(reference), run, sgd, after, "parallel.strategy=ddp", resume=True)
    assert_same_losses(run, expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_rendezvous(reference: Path, tmp_path: Path) -> None:
    """Two torchrun launches of one process each, meeting at a c10d rendezvous: the multi-node path
    (through the `lmforge` console script)."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        torchrun(
            "train",
            config_of(reference),
            "--out",
            tmp_path / "run",
            *overrides("parallel.strategy=ddp"),
            nproc=1,
            wait=False,
            console_script=True,
            launcher=(
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "lmforge-test",
            ),
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(out.count("done: 8 steps") for out, _ in outputs) == 1
    assert_same_losses(tmp_path / "run", reference)


FAILING_RANK = """
import os, sys
from lmforge.errors import LmforgeError
from lmforge.train import trainer
real = trainer.lr_factor
def failing(step, *args, **kwargs):
    if step == 3 and os.environ["RANK"] == "1":  # rank 1 alone, in the middle of the run
        raise LmforgeError("disk on fire")
    return real(step, *args, **kwargs)
trainer.lr_factor = failing
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_job(reference: Path, tmp_path: Path) -> None:
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    result = torchrun(
        script, "train", config_of(reference), "--out", tmp_path / "run", *overrides("parallel.strategy=fsdp")
    )  # a hang would raise TimeoutExpired
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("lmforge train:")]
    assert "lmforge train: error (rank 1 of 2): disk on fire" in ours
    assert all(line.count("\n") == 0 and len(line) < 300 for line in ours)
    assert not any(line.startswith("[rank") for line in result.stderr.splitlines())  # no worker traceback


OTHER_DATA_ON_RANK_1 = """
import os, sys
from lmforge.cli import main
args = sys.argv[1:]
if os.environ["RANK"] == "1":  # this process's copy of the data is another corpus (another machine's disk)
    args = [*args, "--set", "data.dir={other}"]
sys.exit(main(args))
"""


@pytest.mark.slow
def test_a_rank_with_other_data_ends_the_job_with_one_line(reference: Path, tmp_path: Path) -> None:
    """Rank 1 reads a corpus of another alphabet, so builds a model of another vocabulary: one line
    naming the difference (FSDP aborted rank 1 in its first all-gather without saying why; DDP
    printed a traceback)."""
    (tmp_path / "other.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    prepare(str(tmp_path / "other.txt"), tmp_path / "other", tokenizer="char", progress=False)
    script = tmp_path / "other_data.py"
    script.write_text(OTHER_DATA_ON_RANK_1.format(other=tmp_path / "other"))
    result = torchrun(
        script, "train", config_of(reference), "--out", tmp_path / "run", *overrides("parallel.strategy=fsdp")
    )
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("lmforge train:")]
    assert any(
        "(rank 1 of 2): the processes built different models: model.vocab_size is 28 on rank 1, 59 on rank 0"
        in line
        for line in ours
    ), result.stderr
    assert not any(line.startswith("[rank") for line in result.stderr.splitlines())  # no traceback
    assert "terminate called" not in result.stderr


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    config = ModelConfig(n_layer=3, n_head=2, d_model=32, block_size=16, vocab_size=50, dropout=0.1)
    torch.manual_seed(0)
    plain = GPT(config)
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep plain names
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks; the recomputation replays them
        model(x, y)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_activation_checkpointing_in_training(reference: Path, tmp_path: Path) -> None:
    train_in_process(config_of(reference), tmp_path / "run", "train.activation_checkpointing=true")
    assert_same_losses(tmp_path / "run", reference, tolerance=1e-6)
    load(tmp_path / "run", "last", "cpu")  # plain parameter names


def test_the_process_group_waits_parallel_timeout_s() -> None:
    import datetime

    import torch.distributed as dist

    from lmforge.train.distributed import process_group

    assert load_config(None, []).parallel.timeout_s == 1800
    with pytest.raises(LmforgeError, match=r"parallel.timeout_s must be positive"):
        load_config(None, ["parallel.timeout_s=0"])
    with process_group("ddp", "cpu", timeout_s=42.0):  # a group of one, made here
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        assert backend.options._timeout == datetime.timedelta(seconds=42)


def test_parallel_config_errors(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LmforgeError, match=r"parallel.strategy must be one of none, ddp, fsdp; got 'zero'"):
        load_config(None, ["parallel.strategy=zero"])
    with pytest.raises(
        LmforgeError, match=r"optim.name muon is not supported with parallel.strategy = \"fsdp\""
    ):
        load_config(None, ["parallel.strategy=fsdp", "optim.name=muon"])
    with pytest.raises(
        LmforgeError, match=r"train.dtype fp16 is not supported with parallel.strategy = \"fsdp\""
    ):
        load_config(None, ["parallel.strategy=fsdp", "train.dtype=fp16"])
    config = load_config(config_of(reference), [*SMALL, "parallel.strategy=ddp", "train.batch_size=7"])
    with pytest.raises(
        LmforgeError, match=r"train.batch_size \(7\) must be divisible by the number of processes \(2\)"
    ):
        build_run(
            config, tmp_path / "run", dist=Distributed("ddp", rank=0, world=2), device=torch.device("cpu")
        )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        LmforgeError, match=r"started as 2 processes \(torchrun\) but parallel.strategy is \"none\""
    ):
        train_in_process(config_of(reference), tmp_path / "run")


def test_a_per_row_loss_weighs_each_ranks_rows_alike() -> None:
    """Token losses weigh a rank by its scored tokens; a span head's per-example mean by its rows."""
    y = torch.tensor([[1, 2, 3, IGNORE_INDEX], [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    x = torch.zeros_like(y)
    assert Distributed("ddp", rank=0, world=2).shard((x, y))[1] == 3 * 2 / 4
    assert Distributed("ddp", rank=0, world=2).shard((x, y), per_row=True)[1] == 1.0


def test_a_packed_batch_is_sharded_with_its_documents() -> None:
    x, y, documents = (torch.arange(8).view(4, 2) + k for k in range(3))
    (mx, my, md), _ = Distributed("ddp", rank=1, world=2).shard((x, y, documents))
    assert torch.equal(md, documents[2:]) and torch.equal(mx, x[2:]) and torch.equal(my, y[2:])
