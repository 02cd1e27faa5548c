"""`lmforge finetune`: the training loop on prompt/completion data, from scratch or a checkpoint."""

import json
import shutil
from pathlib import Path

import pytest

from lmforge.data.tokenizer import EOT, char_tokenizer
from tests.conftest import PIN_FP32, TINY
from tests.train.conftest import read_metrics


@pytest.fixture
def sst2_small(shared_data: Path, tmp_path: Path) -> Path:
    """300 training and 100 held-out SST-2 examples, and a char tokenizer that covers them."""
    from lmforge.tasks import prepare_task

    prepare_task("sst2", tmp_path / "full")
    folder = tmp_path / "sst2"
    folder.mkdir()
    for split, n in [("train", 300), ("val", 100)]:
        kept = (tmp_path / "full" / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(kept) + "\n")
    text = "".join(
        json.loads(line)["prompt"] + json.loads(line)["completion"]
        for split in ("train", "val")
        for line in (folder / f"{split}.jsonl").read_text().splitlines()
    )
    char_tokenizer(text, specials=[EOT]).save(str(folder / "tokenizer.json"))
    return folder


def finetune_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = [
        "finetune",
        "--out",
        str(out),
        "--set",
        f"data.dir={data}",
        "--set",
        f"data.tokenizer={data / 'tokenizer.json'}",
    ]
    for item in [*TINY, "model.block_size=128", "train.eval_interval=15", "train.max_steps=30", *extra]:
        args += ["--set", item]
    return args


def test_finetune_from_scratch_learns_the_completions(cli, sst2_small: Path, tmp_path: Path) -> None:
    code, out, err = cli(*finetune_args(sst2_small, tmp_path / "run"))
    assert code == 0, err
    steps, evals = read_metrics(tmp_path / "run")
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and "val_bpb" not in evals[0]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    # Stopped after step 20 (its later checkpoints gone), resumed: the losses of the uninterrupted run.
    resumed = copy_up_to(tmp_path / "run", tmp_path / "resumed", 20)
    code, out, err = cli(*finetune_args(sst2_small, resumed), "--resume")
    assert code == 0, err
    assert_same_steps(resumed, tmp_path / "run")


def copy_up_to(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` as if it had stopped at `step`: later checkpoints removed."""
    from lmforge import checkpoint as ckpt

    shutil.copytree(run, copy)
    for c in ckpt.list_checkpoints(copy):
        if c.step > step:
            shutil.rmtree(c.path)
    assert ckpt.list_checkpoints(copy)[-1].step == step
    return copy


def assert_same_steps(run: Path, reference: Path) -> None:
    """Every per-step loss, grad norm and lr, and every eval, as in `reference` (bit for bit: CPU, fp32)."""
    (steps, evals), (ref_steps, ref_evals) = read_metrics(run), read_metrics(reference)
    assert [e["step"] for e in steps] == [e["step"] for e in ref_steps]
    for key in ("loss", "grad_norm", "lr"):
        assert [e[key] for e in steps] == [e[key] for e in ref_steps], key
    assert [(e["step"], e["val_loss"]) for e in evals] == [(e["step"], e["val_loss"]) for e in ref_evals]


def test_finetune_from_a_pretrained_checkpoint(cli, sst2_small: Path, tmp_path: Path) -> None:
    # "Pretrain" on the raw review text with the same tokenizer, then fine-tune from it.
    reviews = "".join(
        json.loads(line)["prompt"] + "\n" for line in (sst2_small / "train.jsonl").read_text().splitlines()
    )
    (tmp_path / "reviews.txt").write_text(reviews * 3)
    code, _, err = cli(
        "prepare",
        tmp_path / "reviews.txt",
        "--tokenizer",
        sst2_small / "tokenizer.json",
        "--out",
        tmp_path / "lm",
        "-q",
    )
    assert code == 0, err
    args = ["train", "--out", tmp_path / "pretrained", "--set", f"data.dir={tmp_path / 'lm'}"]
    for item in [
        *TINY,
        "model.block_size=128",
        "model.vocab_size=" + str(json.loads((tmp_path / "lm" / "meta.json").read_text())["vocab_size"]),
    ]:
        args += ["--set", item]
    assert cli(*args)[0] == 0
    code, _, err = cli(
        "finetune",
        "--out",
        tmp_path / "tuned",
        "--set",
        f"data.dir={sst2_small}",
        "--set",
        f"train.init_from={tmp_path / 'pretrained'}",
        *sum((["--set", s] for s in TINY), []),
        "--set",
        "train.max_steps=10",
    )
    assert code == 0, err
    _, evals = read_metrics(tmp_path / "tuned")
    assert evals[-1]["step"] == 10


def test_lora_trains_only_the_adapters_and_merges(cli, sst2_small: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file

    from lmforge import checkpoint as ckpt
    from lmforge.inference import load

    base_args = finetune_args(sst2_small, tmp_path / "base", "train.max_steps=5")
    assert cli(*base_args)[0] == 0
    code, _, err = cli(
        "finetune",
        "--out",
        tmp_path / "lora",
        "--set",
        f"data.dir={sst2_small}",
        "--set",
        f"train.init_from={tmp_path / 'base'}",
        *sum((["--set", s] for s in TINY), []),
        "--set",
        "train.max_steps=10",
        "--set",
        "lora.rank=4",
        "--set",
        "optim.lr=1e-2",
    )
    assert code == 0, err
    base = load(tmp_path / "base", "best", "cpu").model.state_dict()
    raw = load_file(ckpt.list_checkpoints(tmp_path / "lora")[-1].path / "model.safetensors")
    adapters = {k: v for k, v in raw.items() if "lora_" in k}
    assert adapters and any(
        v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k
    )  # B starts at zero
    for key, value in raw.items():  # every base weight is exactly the starting one
        if "lora_" not in key:
            name = key.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, base[name]), key
    merged = load(tmp_path / "lora", "last", "cpu").model
    assert type(merged).__name__ == "GPT"
    # The merged model computes what the adapted model computes.
    from lmforge.config import load_config
    from lmforge.model import GPT
    from lmforge.model.lora import apply_lora

    config = load_config(tmp_path / "lora" / "config.toml")
    adapted = apply_lora(GPT(config.model), config.lora)
    ckpt.load_weights(ckpt.list_checkpoints(tmp_path / "lora")[-1].path, adapted)
    idx = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], adapted.eval()(idx)[0], rtol=1e-5, atol=1e-5)
        base_model = load(tmp_path / "base", "best", "cpu").model
        assert not torch.allclose(merged(idx)[0], base_model(idx)[0])  # the adapters changed the function


@pytest.mark.slow
def test_lora_run_resumes_with_the_losses_of_an_uninterrupted_one(
    cli, sst2_small: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    lora = ["train.max_steps=10", "train.checkpoint_interval=5", "lora.rank=4", "lora.dropout=0.1"]
    code, _, err = cli(*finetune_args(sst2_small, tmp_path / "run", *lora))
    assert code == 0, err
    resumed = copy_up_to(tmp_path / "run", tmp_path / "resumed", 5)
    code, _, err = cli(*finetune_args(sst2_small, resumed, *lora), "--resume")
    assert code == 0, err
    assert_same_steps(resumed, tmp_path / "run")


def test_eval_without_task_reports_the_completion_loss(cli, sst2_small: Path, tmp_path: Path) -> None:
    assert cli(*finetune_args(sst2_small, tmp_path / "run", PIN_FP32))[0] == 0
    steps, evals = read_metrics(tmp_path / "run")
    assert steps[0]["tokens_per_s"] > 0
    code, out, err = cli("eval", tmp_path / "run", "--checkpoint", "last", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6) and "bpb" not in result


def test_mfu_of_a_finetuning_step_counts_the_flops_torch_measures(sst2_small: Path, tmp_path: Path) -> None:
    """The head runs only at completion positions; MFU must charge it there, not at every token."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lmforge.config import load_config
    from lmforge.train.distributed import Distributed
    from lmforge.train.run import build_run
    from lmforge.train.step import NonFiniteGuard
    from lmforge.train.trainer import open_monitor, train_step

    data = [f"data.dir={sst2_small}", f"data.tokenizer={sst2_small / 'tokenizer.json'}", "data.kind=sft"]
    config = load_config(None, [*data, *TINY, "model.block_size=128"])
    run = build_run(config, tmp_path / "run", dist=Distributed(), device=torch.device("cpu"))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = train_step(run, NonFiniteGuard("stop", False))
    model, seq_len = config.model, result.tokens // config.train.batch_size
    # MATH computes the whole score matrix and masks it; MFU counts the causal half that flash
    # attention executes, on purpose: 6·L·d·T FLOPs per token fewer, forward and backward
    skipped = 6 * model.n_layer * model.d_model * seq_len * result.tokens
    assert result.flops == counter.get_total_flops() - skipped
    with open_monitor(run) as monitor:
        monitor.step(result)
    steps, _ = read_metrics(tmp_path / "run")
    assert steps[0]["matmul_peak_fraction"] == pytest.approx(result.flops / result.seconds / run.peak.flops)
    every_position = (
        run.state.module.flops_per_token(result.tokens // config.train.batch_size) * result.tokens
    )
    assert result.flops < every_position  # what the old formula charged


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.slow
def test_finetune_on_messages_saves_its_chat_template_and_runs_from_it_inherit_it(
    cli, tmp_path: Path
) -> None:
    from lmforge import checkpoint as ckpt
    from lmforge.data.chat_template import ChatTemplate

    data = tmp_path / "chat"
    data.mkdir()
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        )
        for w in ("yes", "no", "maybe", "never", "always", "soon")
    ]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    char_tokenizer(CHATML + "\n" + "".join(lines), specials=[EOT]).save(str(data / "tokenizer.json"))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    short = ["train.max_steps=2", "train.eval_interval=2", "train.checkpoint_interval=2"]
    chatml = f"data.chat_template={tmp_path / 'chatml.jinja'}"
    code, _, err = cli(*finetune_args(data, tmp_path / "first", *short, chatml))
    assert code == 0, err
    saved = ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "first")[-1].path)
    assert saved is not None and saved.source == CHATML
    # A run started from that checkpoint renders its messages, and saves, the same template.
    code, _, err = cli(
        *finetune_args(data, tmp_path / "second", *short, f"train.init_from={tmp_path / 'first'}")
    )
    assert code == 0, err
    assert ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "second")[-1].path) == saved
    # Without a template anywhere, fine-tuning saves the default one it used.
    code, _, err = cli(*finetune_args(data, tmp_path / "plain", *short))
    assert code == 0, err
    assert ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "plain")[-1].path).is_default


def test_packed_finetune_reports_its_data_learns_and_resumes_exactly(
    cli, sst2_small: Path, tmp_path: Path
) -> None:
    """data.pack through the one training loop: fewer, fuller rows; an exact resume (fp32)."""
    args = ("data.pack=true", "train.max_steps=20", "train.checkpoint_interval=5", PIN_FP32)
    code, out, err = cli(*finetune_args(sst2_small, tmp_path / "run", *args))
    assert code == 0, err
    assert (
        f"fine-tuning data: 300 train examples from {sst2_small / 'train.jsonl'} (prompt_completion)" in out
    )
    assert "100 val from" in out and "packed (data.pack)" in out
    steps, evals = read_metrics(tmp_path / "run")
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    resumed = copy_up_to(tmp_path / "run", tmp_path / "resumed", 15)
    code, out, err = cli(*finetune_args(sst2_small, resumed, *args), "--resume")
    assert code == 0, err
    assert_same_steps(resumed, tmp_path / "run")
