"""Controlled sentiment generation, as the DPO paper measures it (Rafailov et al. 2023, section 6.1):
the judge's reward against the sequence-level KL to the reference, for the reference, best-of-N
sampling, DPO at several beta values and SimPO.

- Prompts: the first PREFIX_WORDS words of SST-2 training sentences (of at least MIN_WORDS words), split
  in two disjoint sets: tuning prompts (preference pairs, DPO's val pairs) and report prompts (every
  number reported; no setting was chosen on them).
- Policy: the reference, a language model of SST-2 sentences (one per line): any lm run, e.g. the
  Gutenberg base fine-tuned on them, or the small stand-in of benchmarks/dpo_sentiment/policy.toml. Its
  best checkpoint, the one `train.init_from` starts the DPO runs from.
- Judge, standing in for a person: an SST-2 classifier fine-tuned by the tasks/sst2 recipe, with its own
  tokenizer (the reward is computed from text); the reward of a text is its probability of " positive"
  against " negative" after the task's prompt.
- Preference pairs: --pair-samples samples of the reference per tuning prompt (2, the issue's, by
  default; the paper's IMDb experiment drew 4), every two of them a pair, the one the judge finds more
  positive chosen.
- Reward: the judge's mean positive probability over SAMPLES samples per report prompt.
  KL: KL(policy || reference) of whole samples, estimated on the policy's own samples as the sum over
  each sample's tokens of the exact KL of the two next-token distributions (the Monte-Carlo estimate
  sum log pi / ref, with the expectation over each token taken exactly: unbiased, lower variance).
  Best-of-N picks the most positive of N reference samples by the judge itself (an oracle here, as the
  judge is the reward); its KL is the standard log N - (N - 1) / N.
- Choosing the DPO settings without the report prompts: `--select-lrs` runs DPO at each learning rate
  (and each beta) on the tuning prompts' pairs and prints the val pairs' loss and preference accuracy,
  then stops; the pairs are kept (pairs/meta.json) and reused by the full run with the same settings.

    python benchmarks/dpo_sentiment.py --policy runs/dpo-sentiment/policy --judge runs/dpo-sentiment/judge \\
        --out runs/dpo-sentiment/bench --figure docs/guides/dpo-reward-kl.png
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge import checkpoint as ckpt
from lmforge import inference
from lmforge.config import load_config
from lmforge.data.tokenizer import eot_id
from lmforge.inference.generate import generate
from lmforge.tasks.base import choice_log_probs
from lmforge.tasks.sst2 import LABEL_CHOICES, sst2_prompt
from lmforge.train.trainer import train

CPU = torch.device("cpu")
PREFIX_WORDS = 3  # the prompt: this many leading words of a sentence
MIN_WORDS = 8  # sentences shorter than this are phrases, not reviews: no prompt is taken from them
SAMPLES = 4  # samples per report prompt for each policy (best-of-N draws its own N)


@dataclass
class Samples:
    """Samples of one policy: per prompt, the generated ids (stop token included) and their text."""

    ids: list[list[list[int]]]  # prompt -> sample -> token ids
    texts: list[list[str]]  # prompt -> sample -> the completion's text (up to the newline)


def read_prompts(sst2_train: Path, *, tuning: int, report: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint tuning and report prompts: the first words of distinct SST-2 training sentences."""
    with open(sst2_train, encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        sentences = sorted({r["sentence"].strip() for r in rows if len(r["sentence"].split()) >= MIN_WORDS})
    random.Random(seed).shuffle(sentences)
    prompts = [" ".join(s.split()[:PREFIX_WORDS]) for s in sentences[: tuning + report]]
    return prompts[:tuning], prompts[tuning:]


@torch.no_grad()
def sample(model, tokenizer: Tokenizer, prompts: list[str], *, n: int, max_new: int, seed: int) -> Samples:
    """`n` samples per prompt at temperature 1, each cut after its first newline (one sentence)."""
    generator = torch.Generator().manual_seed(seed)
    stop = eot_id(tokenizer)
    ids: list[list[list[int]]] = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        batch = torch.tensor([prompt_ids] * n)
        steps = torch.stack(list(generate(model, batch, max_new, generator=generator)), dim=1)  # (n, new)
        ids.append([cut_at_newline(tokenizer, row, stop=stop) for row in steps.tolist()])
    texts = [[tokenizer.decode(s).split("\n")[0] for s in per_prompt] for per_prompt in ids]
    return Samples(ids, texts)


def cut_at_newline(tokenizer: Tokenizer, ids: list[int], *, stop: int | None) -> list[int]:
    """`ids` up to and including the first token whose text holds a newline, or the `stop` token."""
    for i, token in enumerate(ids):
        if token == stop or "\n" in tokenizer.decode([token]):
            return ids[: i + 1]
    return ids


def rewards(judge, tokenizer: Tokenizer, prompts: list[str], texts: list[list[str]]) -> list[list[float]]:
    """The judge's probability that each prompt + completion is positive (`tokenizer`: the judge's)."""
    out = []
    for prompt, completions in zip(prompts, texts):
        row = []
        for text in completions:
            scores = choice_log_probs(
                judge, tokenizer, sst2_prompt(prompt + text), choices=LABEL_CHOICES, device=CPU
            )
            row.append(torch.softmax(torch.tensor(scores), dim=0)[1].item())
        out.append(row)
    return out


@torch.no_grad()
def sequence_kl(policy, reference, tokenizer: Tokenizer, prompts: list[str], samples: Samples) -> float:
    """Mean over samples of the summed per-token KL(policy || reference) along each sample."""
    total, count = 0.0, 0
    for prompt, per_prompt in zip(prompts, samples.ids):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        for generated in per_prompt:
            x = torch.tensor([prompt_ids + generated[:-1]])
            start = len(prompt_ids) - 1  # the position that predicts the first generated token
            logp = torch.log_softmax(policy(x).logits[0, start:].float(), -1)
            ref = torch.log_softmax(reference(x).logits[0, start:].float(), -1)
            total += (logp.exp() * (logp - ref)).sum().item()
            count += 1
    return total / count


def write_pairs(folder: Path, prompts: list[str], samples: Samples, scores: list[list[float]]) -> int:
    """TRL-format pairs of every two samples of a tuning prompt, the more positive chosen; the pairs of
    the last tenth of the prompts are val.jsonl. Returns the number of ties left out."""
    folder.mkdir(parents=True, exist_ok=True)
    per_prompt, ties = [], 0
    for prompt, texts, rewards_ in zip(prompts, samples.texts, scores):
        lines = []
        for (a, ra), (b, rb) in itertools.combinations(zip(texts, rewards_), 2):
            if ra == rb or a == b:
                ties += 1
                continue
            chosen, rejected = (a, b) if ra > rb else (b, a)
            lines.append({"prompt": prompt, "chosen": chosen + "\n", "rejected": rejected + "\n"})
        per_prompt.append(lines)
    cut = len(per_prompt) - len(per_prompt) // 10  # val prompts apart from train prompts
    for name, part in [("train", per_prompt[:cut]), ("val", per_prompt[cut:])]:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for lines in part for p in lines))
    return ties


def tune(policy: Path, pairs: Path, out: Path, *, objective: str, beta: float, lr: float, args) -> Path:
    """A DPO or SimPO run from the reference on the pairs; every setting fixed beforehand."""
    overrides = [
        f"data.dir={pairs}",
        "data.kind=sft",
        f"train.init_from={policy}",
        f"train.objective={objective}",
        f"preference.beta={beta}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_interval={args.steps // 2}",
        f"train.checkpoint_interval={args.steps // 2}",
        "train.keep_checkpoints=2",
        "train.device=cpu",
        f"optim.lr={lr}",
        f"lora.rank={args.lora_rank}",
        "optim.weight_decay=0.0",
        "schedule.warmup_steps=10",
        "schedule.min_lr=0.0",
        "model.dropout=0.0",
        "log.progress=false",
    ]
    train(load_config(None, overrides), out, overwrite=True)
    return out


def val_metrics(run: Path) -> dict[int, dict]:
    """The val pairs' metrics of a tuned run at each evaluation, by step (its metrics.jsonl)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    evals = [entry for entry in map(json.loads, filter(None, lines)) if "val_loss" in entry]
    return {e["step"]: {k: v for k, v in e.items() if k.startswith("val_")} for e in evals}


def evaluate_policy(name: str, model, ctx: dict, seed: int) -> dict:
    """Reward and KL of a policy on the report prompts."""
    tokenizer, prompts = ctx["tokenizer"], ctx["report"]
    samples = sample(model, tokenizer, prompts, n=SAMPLES, max_new=ctx["max_new"], seed=seed)
    scores = rewards(ctx["judge"], ctx["judge_tokenizer"], prompts, samples.texts)
    reward = sum(map(sum, scores)) / sum(map(len, scores))
    kl = sequence_kl(model, ctx["reference"], tokenizer, prompts, samples)
    example = f"{prompts[0]}{samples.texts[0][0]}"
    return {"policy": name, "reward": reward, "kl": kl, "example": example}


def best_of_n(ctx: dict, ns: list[int], seed: int) -> list[dict]:
    """Best-of-N from the reference, for each N: the most positive of N samples, by the judge."""
    tokenizer, prompts = ctx["tokenizer"], ctx["report"]
    samples = sample(ctx["reference"], tokenizer, prompts, n=max(ns), max_new=ctx["max_new"], seed=seed)
    scores = rewards(ctx["judge"], ctx["judge_tokenizer"], prompts, samples.texts)
    rows = []
    for n in ns:
        reward = sum(max(per_prompt[:n]) for per_prompt in scores) / len(scores)
        rows.append({"policy": f"best-of-{n}", "reward": reward, "kl": math.log(n) - (n - 1) / n})
    return rows


def load_model(target: Path):
    """A run's last checkpoint, or a checkpoint folder, in fp32 on the CPU."""
    return inference.load(target, "last", "cpu", dtype="fp32").model


def figure(rows: list[dict], out: Path) -> None:
    """Reward against KL: one marker per policy, the best-of-N and each method's checkpoints joined."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for index, (group, members) in enumerate(groups.items()):
        members = sorted(members, key=lambda r: r["kl"])
        ax.plot(
            [r["kl"] for r in members], [r["reward"] for r in members], "o-", color=f"C{index}", label=group
        )
    ax.set_xlabel("sequence-level KL to the reference (nats)")
    ax.set_ylabel("reward: judge's P(positive)")
    ax.set_title("Controlled sentiment generation (SST-2 prompts)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, help="the reference policy's run")
    parser.add_argument("--judge", type=Path, help="the SST-2 classifier's run")
    parser.add_argument("--sst2", type=Path, default=Path("../shared/data/sst2/train.tsv"))
    parser.add_argument("--out", type=Path, required=True, help="work folder: pairs, runs, results.json")
    parser.add_argument("--figure", type=Path, help="the reward-KL picture (PNG)")
    parser.add_argument("--tuning-prompts", type=int, default=1000)
    parser.add_argument("--report-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    parser.add_argument("--simpo-beta", type=float, default=2.0, help="0: no SimPO run")
    parser.add_argument(
        "--pair-samples",
        type=int,
        default=2,
        help="samples per tuning prompt, every two of them a pair (2: the issue's setting; the paper's IMDb "
        "experiment drew 4, 6 pairs per prompt)",
    )
    parser.add_argument("--best-of", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each DPO/SimPO run")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tune")
    parser.add_argument(
        "--select-lrs",
        type=float,
        nargs="+",
        help="only choose: DPO at each of these lr (and each beta) on the tuning pairs; prints the val "
        "pairs' loss and preference accuracy (selection.json) and measures nothing on the report prompts",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: these tiny models gain nothing from more)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="only report: the rows of these work folders' results.json (one experiment's methods run by "
        "several processes with the same prompts and seeds) in --out/results.json and --figure",
    )
    args = parser.parse_args()
    if args.merge:
        rows = merge(args.merge)
        runs = {str(f): json.loads((f / "results.json").read_text()) for f in args.merge}
        merged = {folder: {"args": r["args"], "wall_s": r.get("wall_s")} for folder, r in runs.items()}
        write_results(args, rows, {"merged": merged})
        return
    if args.policy is None or args.judge is None:
        parser.error("--policy and --judge are required (unless --merge)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    rows = run_experiment(args)
    if not args.select_lrs:
        write_results(args, rows, {"wall_s": time.perf_counter() - start})


def write_results(args, rows: list[dict], extra: dict) -> None:
    """results.json (the arguments, the rows and `extra`), the table on stdout, and the figure."""
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows} | extra
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'policy':24} {'reward':>7} {'KL':>7}")
    for row in rows:
        print(f"{row['policy']:24} {row['reward']:7.4f} {row['kl']:7.3f}")
    wall = f"wall time {extra['wall_s']:.0f} s " if "wall_s" in extra else ""
    print(f"{wall}-> {args.out / 'results.json'}")
    if args.figure:
        figure(rows, args.figure)


def merge(folders: list[Path]) -> list[dict]:
    """The rows of several results.json, each policy once; a policy in two of them (the reference and
    best-of-N, which every process measures) must have the same numbers in both."""
    merged: dict[str, dict] = {}
    for folder in folders:
        for row in json.loads((folder / "results.json").read_text())["rows"]:
            seen = merged.setdefault(row["policy"], row)
            if (seen["reward"], seen["kl"]) != (row["reward"], row["kl"]):
                raise SystemExit(
                    f"{folder}: {row['policy']} differs from the other folders' (other prompts or seeds?)"
                )
    return list(merged.values())


def pairs_from_reference(
    args, reference, tokenizer: Tokenizer, judge, judge_tokenizer: Tokenizer, tuning: list[str]
) -> int:
    """The tuning prompts' preference pairs in out/pairs, made once: a later run with the same prompts,
    policy, judge and sampling reuses them (pairs/meta.json says what made them). Returns their number."""
    folder = args.out / "pairs"
    made_by = {
        key: str(getattr(args, key))
        for key in ["policy", "judge", "sst2", "tuning_prompts", "pair_samples", "max_new_tokens", "seed"]
    }
    meta_file = folder / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text())["made_by"] == made_by:
        meta = json.loads(meta_file.read_text())
        print(
            f"{meta['pairs']} preference pairs ({meta['ties']} ties left out), reused: {folder}", flush=True
        )
        return meta["pairs"]
    k = args.pair_samples
    pair_samples = sample(reference, tokenizer, tuning, n=k, max_new=args.max_new_tokens, seed=args.seed + 1)
    pair_rewards = rewards(judge, judge_tokenizer, tuning, pair_samples.texts)
    ties = write_pairs(folder, tuning, pair_samples, pair_rewards)
    pairs = len(tuning) * k * (k - 1) // 2 - ties
    meta_file.write_text(json.dumps({"made_by": made_by, "pairs": pairs, "ties": ties}, indent=1) + "\n")
    print(f"{pairs} preference pairs ({ties} ties left out) -> {folder}", flush=True)
    return pairs


def select_lr(args) -> None:
    """DPO at each lr of --select-lrs and each beta on the tuning pairs; the val pairs' metrics of each."""
    table = []
    for lr, beta in itertools.product(args.select_lrs, args.betas):
        run = tune(
            args.policy, args.out / "pairs", args.out / f"select-lr{lr:g}-beta{beta:g}",
            objective="dpo", beta=beta, lr=lr, args=args,
        )  # fmt: skip
        for step, metrics in val_metrics(run).items():
            table.append({"lr": lr, "beta": beta, "step": step} | metrics)
    (args.out / "selection.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"{'lr':>8} {'beta':>5} {'step':>5} {'val loss':>9} {'val acc':>8} {'margin':>7} {'KL':>7}")
    for r in table:
        accuracy, margin, kl = (
            r.get(f"val_{k}", math.nan) for k in ["preference_accuracy", "reward_margin", "kl_to_reference"]
        )
        print(
            f"{r['lr']:8.0e} {r['beta']:5g} {r['step']:5d} {r['val_loss']:9.4f} "
            f"{accuracy:8.4f} {margin:7.3f} {kl:7.3f}"
        )


def run_experiment(args) -> list[dict]:
    """Pairs from the reference, the tuned runs, and every policy's reward and KL on the report prompts."""
    tuning, report = read_prompts(
        args.sst2, tuning=args.tuning_prompts, report=args.report_prompts, seed=args.seed
    )
    # "best": the checkpoint train.init_from resolves, so the reference is the weights DPO starts from
    session = inference.load(args.policy, "best", "cpu", dtype="fp32")
    reference, tokenizer = session.model, session.tokenizer
    judge_session = inference.load(args.judge, "best", "cpu", dtype="fp32")
    judge, judge_tokenizer = judge_session.model, judge_session.tokenizer
    pairs_from_reference(args, reference, tokenizer, judge, judge_tokenizer, tuning)
    if args.select_lrs:
        select_lr(args)
        return []
    ctx = {"tokenizer": tokenizer, "report": report, "judge": judge, "judge_tokenizer": judge_tokenizer}
    ctx |= {"reference": reference, "max_new": args.max_new_tokens}
    rows = [evaluate_policy("reference", reference, ctx, args.seed + 2) | {"group": "reference"}]
    rows += [
        r | {"group": "best-of-N (judge as oracle)"} for r in best_of_n(ctx, args.best_of, args.seed + 3)
    ]
    methods = [("dpo", beta) for beta in args.betas] + [("simpo", args.simpo_beta)] * (args.simpo_beta > 0)
    for objective, beta in methods:
        run = tune(
            args.policy,
            args.out / "pairs",
            args.out / f"{objective}-beta{beta:g}",
            objective=objective,
            beta=beta,
            lr=args.lr,
            args=args,
        )
        val = val_metrics(run)
        for checkpoint in ckpt.list_checkpoints(run):
            name = f"{objective} beta={beta:g} step {checkpoint.step}"
            row = evaluate_policy(name, load_model(checkpoint.path), ctx, args.seed + 2)
            row |= {"val": val.get(checkpoint.step, {})}  # the tuning prompts' val pairs, for the record
            rows.append(
                row | {"group": f"{objective.upper() if objective == 'dpo' else 'SimPO'} beta={beta:g}"}
            )
            print(f"{name}: reward {row['reward']:.4f}, KL {row['kl']:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
