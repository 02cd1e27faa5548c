"""DP-SGD's price and effect: val loss, tokens/s and a leakage audit at epsilon = inf, 8 and 3.

Prepares TinyShakespeare (char) with canaries (10 per repeat count 0, 1, 4, 16) and about 512 member and
512 held-out lines (`--holdout-lines`, for membership inference), trains the same small
model for the same number of steps without privacy and with `privacy.target_epsilon` 8 and 3, then
runs `lmforge audit` on each final checkpoint, and prints one table of cost and one of leakage.

    .venv/bin/python benchmarks/privacy.py [--out out/privacy-bench] [--steps 300] [--epsilons inf,8,3]

Each training run is a fresh `lmforge train` process (OMP_NUM_THREADS=1: a small model on a busy
machine); tokens/s is the median over the steps in metrics.jsonl (a DP batch varies in size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = [  # the shakespeare-char recipe made smaller, as benchmarks/audit_canaries.sh does
    "model.n_layer=2",
    "model.d_model=64",
    "model.block_size=64",
    "train.batch_size=64",
    "train.device=cpu",
    "train.dtype=fp32",
    "train.eval_interval=0",
    "train.checkpoint_interval=0",
    "log.progress=false",
]


def lmforge(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"lmforge {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def train(data: Path, run: Path, steps: int, epsilon: float) -> dict:
    sets = [*MODEL, f"data.dir={data}", f"train.max_steps={steps}", "schedule.warmup_steps=30"]
    if epsilon != float("inf"):
        sets.append(f"privacy.target_epsilon={epsilon}")
    args = ["train", "shakespeare-char", "--out", str(run), "--overwrite"]
    start = time.perf_counter()
    lmforge(*args, *[f"--set={s}" for s in sets])
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [e for e in lines if "loss" in e]
    final = [e for e in lines if "val_loss" in e][-1]
    meta = json.loads(next((run / "checkpoints").glob("step-*/meta.json")).read_text())
    return {
        "epsilon": epsilon,
        "val_loss": final["val_loss"],
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in steps_logged),
        "wall_s": wall,
        "privacy": meta.get("privacy"),
    }


def audit(run: Path) -> dict:
    out = lmforge("audit", str(run), "--checkpoint", "last", "--device", "cpu", "--json")  # prefix 32, k 32
    return json.loads(out)


def print_tables(results: list[dict]) -> None:
    print("\n| epsilon (delta 1e-5) | noise multiplier | val loss | tokens/s (median step) | train wall s |")
    print("|---|---|---|---|---|")
    for r in results:
        p = r["privacy"]
        eps = "inf (no DP)" if p is None else f"{r['epsilon']:g} (spent {p['epsilon']:.2f})"
        sigma = "-" if p is None else f"{p['noise_multiplier']:.3f}"
        print(f"| {eps} | {sigma} | {r['val_loss']:.4f} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |")
    repeats = [g["repeats"] for g in results[0]["audit"]["exposure"]["by_repeats"]]
    head = " | ".join(f"exposure r={n}" for n in repeats)
    columns = "memorised k=32 train / val | tokens reproduced train / val | membership AUC"
    print(f"\n| epsilon | {head} | {columns} |")
    print("|---" * (len(repeats) + 4) + "|")
    for r in results:
        a = r["audit"]
        exposure = " | ".join(
            f"{g['exposure_sampled']:.2f} / {g['exposure_fit']:.2f}" for g in a["exposure"]["by_repeats"]
        )
        m = a["memorisation"]
        print(
            f"| {r['epsilon']:g} | {exposure} | {m['train_exact']:.2%} / {m['val_exact']:.2%} | "
            f"{m['train_token_match']:.1%} / {m['val_token_match']:.1%} | {a['membership']['auc']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/privacy-bench"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epsilons", default="inf,8,3")
    args = parser.parse_args()
    data = args.out / "data"
    lmforge("prepare", "tinyshakespeare", "--tokenizer", "char", "--out", str(data), "--canaries", "10",
            "--canary-repeats", "0,1,4,16", "--holdout-lines", "512", "--overwrite", "-q")  # fmt: skip
    results = []
    for epsilon in (float(e) for e in args.epsilons.split(",")):
        run = args.out / f"run-eps-{epsilon:g}"
        result = train(data, run, args.steps, epsilon)
        result["audit"] = audit(run)
        print(json.dumps({k: v for k, v in result.items() if k != "audit"}), flush=True)
        results.append(result)
    print_tables(results)


if __name__ == "__main__":
    main()
