"""train.objective = "dpo" / "simpo": preference pairs trained through the one loop, checked against TRL."""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.config import ModelConfig, PreferenceConfig, load_config
from lmforge.data.chat_template import ChatTemplate
from lmforge.data.preference import PreferencePair, collate_pairs, parse_pair
from lmforge.data.sft import Example
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT
from lmforge.targets import IGNORE_INDEX
from lmforge.train.objective import PreferenceLoss, frozen_reference, sequence_logps, simpo_losses
from tests.conftest import PIN_FP32, TINY, random_char_run, snapshot
from tests.train.conftest import read_metrics
from tests.train.test_distributed import torchrun
from tests.train.test_finetune import assert_same_steps, copy_up_to

ALPHABET = "abcdefghijklmnopqrstuvwxyz .:"
STATS = ("reward_chosen", "reward_rejected", "reward_margin", "preference_accuracy", "kl_to_reference")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random character model (the base to tune) and pairs that always prefer " good." to " bad."."""
    root = tmp_path_factory.mktemp("pairs")
    random_char_run(root / "base", ALPHABET, n_layer=2, d_model=32, block_size=64)
    rng = random.Random(0)
    subjects = ["the film", "this movie", "the plot", "the cast", "it", "the story", "the ending"]
    (root / "data").mkdir()
    for split, n in [("train", 64), ("val", 16)]:
        lines = [
            {"prompt": f"review: {rng.choice(subjects)} was", "chosen": " good.", "rejected": " bad."}
            for _ in range(n)
        ]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def tune_args(pairs: Path, out: Path, *extra: str) -> list[str]:
    settings = [
        *TINY,
        "model.block_size=64",
        f"data.dir={pairs / 'data'}",
        f"train.init_from={pairs / 'base'}",
        "train.objective=dpo",
        "train.max_steps=12",
        "train.eval_interval=6",
        "train.checkpoint_interval=6",
        "preference.beta=0.5",
        *extra,
    ]
    return ["finetune", "--out", str(out), *sum((["--set", s] for s in settings), [])]


def test_dpo_learns_the_preference_and_logs_rewards_margin_accuracy_and_kl(
    cli, pairs: Path, tmp_path
) -> None:
    code, out, err = cli(*tune_args(pairs, tmp_path / "run", PIN_FP32))
    assert code == 0, err
    steps, evals = read_metrics(tmp_path / "run")
    # At step 1 the policy is the reference: every reward and the KL are 0, the loss log 2
    assert [steps[0][k] for k in STATS] == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert steps[-1]["reward_margin"] > 1.0 and steps[-1]["kl_to_reference"] > 0
    assert evals[-1]["val_preference_accuracy"] == 1.0 and evals[-1]["val_loss"] < 0.3
    assert "val_ppl" not in evals[-1] and "preference_accuracy 1" in out


def test_dpo_resumes_exactly(cli, pairs: Path, tmp_path: Path) -> None:
    assert cli(*tune_args(pairs, tmp_path / "run", PIN_FP32))[0] == 0
    resumed = copy_up_to(tmp_path / "run", tmp_path / "resumed", 6)
    code, _, err = cli(*tune_args(pairs, resumed, PIN_FP32), "--resume")
    assert code == 0, err
    assert_same_steps(resumed, tmp_path / "run")
    steps, ref_steps = read_metrics(resumed)[0], read_metrics(tmp_path / "run")[0]
    assert [[e[k] for k in STATS] for e in steps] == [[e[k] for k in STATS] for e in ref_steps]


def test_dpo_resume_with_another_reference_or_objective_is_refused_and_writes_nothing(
    cli, pairs: Path, tmp_path: Path
) -> None:
    """dpo's reference is train.init_from's weights: another one on resume would change the loss
    midway, as would another objective; both are refused as another optim.name is."""
    run, base = tmp_path / "run", pairs / "base"
    assert cli(*tune_args(pairs, run, "train.max_steps=6"))[0] == 0
    other = random_char_run(tmp_path / "other", ALPHABET, n_layer=2, d_model=32, block_size=64, seed=1)
    before = snapshot(run)
    changes = [
        (f"train.init_from={other}", f"train.init_from: '{base}' in the checkpoint, '{other}' in the config"),
        ("train.objective=simpo", "train.objective: 'dpo' in the checkpoint, 'simpo' in the config"),
    ]
    for change, message in changes:
        code, _, err = cli(
            "finetune", "--out", run, "--resume", "--set", change, "--set", "train.max_steps=12"
        )
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err
        assert snapshot(run) == before


def test_dpo_with_lora_takes_the_model_with_adapters_off_as_reference(
    cli, pairs: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    code, _, err = cli(*tune_args(pairs, tmp_path / "run", PIN_FP32, "lora.rank=4", "optim.lr=1e-2"))
    assert code == 0, err
    steps, evals = read_metrics(tmp_path / "run")
    assert [steps[0][k] for k in STATS] == [0.0, 0.0, 0.0, 0.0, 0.0]  # B = 0: adapters on = adapters off
    assert steps[-1]["reward_margin"] > 0.1 and evals[-1]["val_kl_to_reference"] > 0


def test_simpo_needs_no_reference_and_learns_the_preference(cli, pairs: Path, tmp_path: Path) -> None:
    code, _, err = cli(
        *tune_args(pairs, tmp_path / "run", PIN_FP32, "train.objective=simpo", "preference.beta=2")
    )
    assert code == 0, err
    steps, evals = read_metrics(tmp_path / "run")
    assert "kl_to_reference" not in steps[0] and steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert evals[-1]["val_preference_accuracy"] == 1.0


@pytest.mark.slow
def test_dpo_in_two_processes_matches_one(pairs: Path, tmp_path: Path, cli) -> None:
    assert cli(*tune_args(pairs, tmp_path / "one", PIN_FP32))[0] == 0
    result = torchrun(*tune_args(pairs, tmp_path / "two", PIN_FP32, "parallel.strategy=ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    (one, one_evals), (two, two_evals) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "grad_norm", *STATS):
        assert [e[key] for e in two] == pytest.approx([e[key] for e in one], abs=1e-5), key
    assert [e["val_loss"] for e in two_evals] == pytest.approx([e["val_loss"] for e in one_evals], abs=1e-5)


def test_dpo_without_a_starting_checkpoint_is_refused(pairs: Path) -> None:
    with pytest.raises(LmforgeError, match="train.init_from must name the checkpoint"):
        load_config(None, ["train.objective=dpo", f"data.dir={pairs}", "data.kind=sft"])
    with pytest.raises(LmforgeError, match='data.kind must be "sft"'):
        load_config(None, ["train.objective=simpo"])


# --- the data -------------------------------------------------------------------------------------------


def test_pairs_in_trl_standard_and_conversational_formats() -> None:
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chosen, rejected = parse_pair({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, template)
    assert [s.text for s in chosen if s.assistant] == [" yes"] and [s.text for s in rejected] == ["Q:", " no"]
    user = [{"role": "user", "content": "hi"}]
    explicit = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    chosen, rejected = parse_pair(explicit, template)
    assert "".join(s.text for s in chosen) == "user: hi\nassistant: hello\n"
    assert [s.text for s in rejected if s.assistant] == ["assistant: go away\n"]
    # TRL's implicit prompt: whole conversations; the shared turns (an assistant's included) are the prompt
    earlier = [*user, {"role": "assistant", "content": "hm"}, {"role": "user", "content": "and?"}]
    implicit = {
        "chosen": [*earlier, {"role": "assistant", "content": "fine"}],
        "rejected": [*earlier, {"role": "assistant", "content": "no"}],
    }
    chosen, rejected = parse_pair(implicit, template)
    assert [s.text for s in chosen if s.assistant] == ["assistant: fine\n"]
    assert [s.text for s in rejected if s.assistant] == ["assistant: no\n"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, "expected fields 'chosen' and 'rejected'"),
        ({"chosen": "b", "rejected": "c"}, "need a string 'prompt'"),
        ({"prompt": "a", "chosen": " ", "rejected": "c"}, "empty chosen completion"),
        (
            {"chosen": [{"role": "assistant", "content": "x"}]}
            | {"rejected": [{"role": "assistant", "content": "x"}]},
            "the same conversation",
        ),
        (  # not the same conversation, as it was called: the rejected one goes on
            {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
            | {"rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 2},
            "'rejected' continues 'chosen': they differ in no turn both have",
        ),
    ],
)
def test_bad_pairs_say_what_is_wrong(record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pair(record, ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}"))


def test_a_side_that_says_nothing_but_ends_is_a_response_a_pair_may_reject() -> None:
    """A sampled response can be the end of text alone (benchmarks/dpo_sentiment.py samples such):
    unlike a fine-tuning answer, it is a side of a pair, trained on as that end token."""
    template = ChatTemplate.default(char_tokenizer("abc :\n", specials=[EOT]))
    chosen, rejected = parse_pair({"prompt": "a", "chosen": " b", "rejected": ""}, template)
    assert [s.text for s in chosen if s.assistant] == [f" b{EOT}"]
    assert [s.text for s in rejected if s.assistant] == [EOT]


def test_a_bad_line_names_file_and_line(cli, pairs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((pairs / "data" / "train.jsonl").read_text() + '{"prompt": "x"}\n')
    (data / "val.jsonl").write_text((pairs / "data" / "val.jsonl").read_text())
    code, _, err = cli(*tune_args(pairs, tmp_path / "run", f"data.dir={data}"))
    assert code != 0 and f"{data / 'train.jsonl'}:65: expected fields 'chosen' and 'rejected'" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# --- against TRL ----------------------------------------------------------------------------------------


def trl_batch(pairs_n: int = 3, length: int = 12, vocab: int = 40, seed: int = 0) -> dict:
    """A batch as TRL's DPOTrainer takes it: rows [chosen..., rejected...], prompt, completion, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2 * pairs_n, length), generator=g)
    completion = torch.zeros_like(ids)
    attention = torch.ones_like(ids)
    for row in range(2 * pairs_n):
        prompt = 2 + row % 3
        end = length - (row * 2) % 5  # padded rows
        completion[row, prompt:end] = 1
        attention[row, end:] = 0
        ids[row, end:] = 0
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def lmforge_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch as lmforge's (x, y), with pair i's chosen row at 2i and rejected row at 2i + 1."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)
    n = ids.size(0) // 2
    order = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).flatten()
    return x[order], y[order]


class FusedHeadModel(torch.nn.Module):
    """An lmforge GPT answering as TRL's `add_fused_lm_head` model does: per-token log-probs of the
    labels (0 where the label is -100), and the statistics TRL logs beside them."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, labels, **ignored):
        logits = self.gpt(input_ids[:, :-1]).logits.float()  # (B, T - 1, V)
        targets = labels[:, 1:]
        mask = targets != -100
        logp = torch.log_softmax(logits, -1)
        token_logps = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
        entropy = -(logp.exp() * logp).sum(-1).detach()
        return SimpleNamespace(
            log_probs=token_logps,
            entropy=entropy,
            mean_logits=logits.mean(-1).detach(),
            is_top1=logits.argmax(-1) == targets,
        )


def trl_dpo_loss(model: torch.nn.Module, batch: dict, *, beta: float, loss_type: str) -> tuple:
    """TRL DPOTrainer's own loss code (`_compute_loss`) on `batch`, its reference log-probs precomputed."""
    from trl import DPOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"),
            gather=lambda t: t,
            gather_for_metrics=lambda t: t,
            unwrap_model=lambda m: m,
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_gradient_equal_trl_dpo_trainer(loss_type: str) -> None:
    pytest.importorskip("trl")
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=16, vocab_size=40)
    policy, reference = GPT(config), GPT(config)  # two different models: the rewards are not 0
    batch = trl_batch()
    x, y = lmforge_rows(batch)
    with torch.no_grad():  # the reference's log-probs, summed per row by TRL's own rule, precomputed
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        ref = FusedHeadModel(reference)(batch["input_ids"], labels).log_probs.sum(1)
    trl_inputs = batch | {"ref_chosen_logps": ref[:3], "ref_rejected_logps": ref[3:]}
    trl_policy = copy.deepcopy(policy)
    fused = FusedHeadModel(trl_policy).train()
    expected, trl_metrics = trl_dpo_loss(fused, trl_inputs, beta=0.3, loss_type=loss_type)
    expected.backward()

    objective = PreferenceLoss(PreferenceConfig(beta=0.3, loss_type=loss_type), frozen_reference(reference))
    loss, stats = objective(policy.train(), x, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for (name, p), q in zip(policy.named_parameters(), trl_policy.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert stats["reward_chosen"].item() == pytest.approx(trl_metrics["rewards/chosen"][0], abs=1e-5)
    assert stats["reward_margin"].item() == pytest.approx(trl_metrics["rewards/margins"][0], abs=1e-5)
    assert stats["preference_accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"][0])


def test_simpo_loss_equals_trl_cpo_trainer_simpo() -> None:
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(1)
    policy = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=16, vocab_size=40))
    x, y = lmforge_rows(trl_batch())
    logps = sequence_logps(policy(x, y, only_targets=True).logits, y)
    losses, chosen, rejected = simpo_losses(logps, beta=2.0, gamma=0.6)
    trainer = SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=0.6, beta=2.0, label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    mean_logps = logps.logps / logps.tokens  # CPOTrainer averages per token for simpo
    expected, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, mean_logps[0::2], mean_logps[1::2])
    assert torch.allclose(losses, expected, atol=1e-6)
    assert torch.allclose(chosen, trl_chosen) and torch.allclose(rejected, trl_rejected)


def test_a_batch_of_pairs_keeps_each_pair_in_two_adjacent_rows() -> None:
    pair = PreferencePair(
        Example([1, 2, 3, 4], [False, False, True, True]), Example([1, 2, 5], [False, False, True])
    )
    other = PreferencePair(
        Example([6, 7, 8], [False, True, True]), Example([6, 9, 9, 9], [False, True, True, True])
    )
    x, y = collate_pairs([pair, other])
    assert x.size(0) == 4
    assert x[:, 0].tolist() == [1, 1, 6, 6]  # chosen, rejected of pair 0, then of pair 1
    assert y[0, :3].tolist() == [IGNORE_INDEX, 3, 4] and y[1, :2].tolist() == [IGNORE_INDEX, 5]


def test_plot_adds_the_preference_panels_with_train_and_val(cli, pairs: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lmforge.report.plot import plot_runs

    assert cli(*tune_args(pairs, tmp_path / "run", "train.max_steps=6", "train.eval_interval=3"))[0] == 0
    fig = plot_runs([tmp_path / "run"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[4:] == [
        "reward margin (chosen - rejected)",
        "preference accuracy",
        "KL to the reference (nats)",
    ]
    steps, evals = read_metrics(tmp_path / "run")
    train_line, val_line = fig.axes[4].get_lines()
    assert list(train_line.get_ydata()) == [e["reward_margin"] for e in steps]
    assert list(val_line.get_ydata()) == [e["val_reward_margin"] for e in evals]
