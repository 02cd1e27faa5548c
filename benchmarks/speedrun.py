"""Wall time to a target validation loss on TinyShakespeare-char, whole process included.

Runs each config as its own `lmforge train` process with `train.stop_at_val_loss`, and
reports the wall time of the whole process (start-up, compile, evals, checkpoints), the
step and the full-split val loss at which the target was reached. By default it runs
nanoGPT's CPU recipe and lmforge's speedrun recipe in the same invocation and prints the
ratio, since this machine's speed drifts between runs.

Every run gets the same evaluation and checkpoint schedule (`SAME_SCHEDULE`: one full-split
eval and one checkpoint, both at the end), whatever its config says, so that no side pays for
more evals or checkpoints than the other. Every config after the first (the reference) whose
train.dtype resolves to something other than fp32 runs a second time in fp32, and both ratios
are printed: how much of the speed-up is bf16's.

    .venv/bin/python benchmarks/speedrun.py                       # both configs, target 1.90
    .venv/bin/python benchmarks/speedrun.py \\
        --configs src/lmforge/recipes/speedrun-shakespeare-char-cpu.toml \\
        --set optim.muon_lr=0.03                                  # try a variation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "src" / "lmforge" / "recipes"  # the packaged recipes
BASELINE = RECIPES_DIR / "nanogpt-shakespeare-char-cpu.toml"
SPEEDRUN = RECIPES_DIR / "speedrun-shakespeare-char-cpu.toml"

# Overrides every run gets alike. nanoGPT's recipe evaluates the whole val split and checkpoints
# every 500 steps, the speedrun recipe once at the end: left as configured, the baseline would pay
# for three more of each. Only the final eval decides whether the target was reached.
SAME_SCHEDULE = {
    "train.eval_interval": "0",  # evaluate only at the end
    "train.checkpoint_interval": "0",  # checkpoint only at the end
    "train.eval_batch_size": "128",  # the same number of eval batches over the same split
}


def machine() -> dict:
    """The CPU the figures come from: bf16 speed differs ~200x between this project's machine kinds."""
    import torch

    from lmforge.runtime import native_bf16

    info = {"model": "unknown", "family": "unknown", "flags": ""}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                info["model"] = value
            elif key == "cpu family":
                info["family"] = value
            elif key == "flags":
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                info["flags"] = " ".join(f for f in value.split() if f in wanted)
    return info | {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(torch.device("cpu")),
    }


def ensure_data(data_dir: Path) -> None:
    if not (data_dir / "meta.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lmforge",
                "prepare",
                "tinyshakespeare",
                "--tokenizer",
                "char",
                "--out",
                str(data_dir),
                "-q",
            ],
            check=True,
        )


def run(config: Path, data_dir: Path, target: float, overrides: list[str], out: Path) -> dict:
    """One `lmforge train` process; its wall time, final eval, resolved dtype and schedule."""
    from lmforge.config import load_config

    args = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        str(config),
        "--out",
        str(out),
        "--overwrite",
        "--set",
        f"data.dir={data_dir}",
        "--set",
        f"train.stop_at_val_loss={target}",
        "--set",
        "log.progress=false",
    ]
    for item in [*overrides, *(f"{key}={value}" for key, value in SAME_SCHEDULE.items())]:
        args += ["--set", item]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{config.name} failed:\n{result.stderr[-2000:]}")
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in entries if "val_loss" in e]
    steps = [e for e in entries if "loss" in e]
    final = evals[-1]
    train = load_config(out / "config.toml").train  # the run's own: train.dtype resolved
    return {
        "config": config.name,
        "dtype": train.dtype,
        "schedule": {key: getattr(train, key.removeprefix("train.")) for key in SAME_SCHEDULE},
        "wall_s": wall,
        "reached": final["val_loss"] <= target,
        "step": final["step"],
        "val_loss": final["val_loss"],
        "evals": [(e["step"], round(e["val_loss"], 4)) for e in evals],
        "train_s": steps[-1]["elapsed_s"],
    }


def label(result: dict) -> str:
    return f"{result['config']} ({result['dtype']})"


def ratios(results: list[dict]) -> list[dict]:
    """Each run's wall time over the reference's (the first run), where both reached the target."""
    reference = results[0]
    return [
        {"run": label(r), "reference": label(reference), "ratio": r["wall_s"] / reference["wall_s"]}
        for r in results[1:]
        if r["reached"] and reference["reached"]
    ]


def precision_gains(results: list[dict]) -> list[dict]:
    """For each config run in a low precision and in fp32: how many times faster the low precision was."""
    fp32 = {r["config"]: r for r in results[1:] if r["dtype"] == "fp32"}
    return [
        {"config": r["config"], "dtype": r["dtype"], "speedup": fp32[r["config"]]["wall_s"] / r["wall_s"]}
        for r in results[1:]
        if r["dtype"] != "fp32" and r["config"] in fp32
    ]


def schedule_override(items: list[str]) -> str | None:
    return next((item for item in items if item.partition("=")[0].strip() in SAME_SCHEDULE), None)


def run_all(args: argparse.Namespace) -> list[dict]:
    """Each config in turn; after the first, a config that resolves to bf16 runs again in fp32."""
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, config in enumerate(args.configs):
            overrides = [] if config.resolve() == BASELINE else args.set
            out = Path(scratch) / f"{i}-{config.stem}"
            results.append(run(config, args.data.resolve(), args.target, overrides, out))
            report(results[-1])
            if i > 0 and results[-1]["dtype"] != "fp32" and not args.no_fp32:
                fp32 = [*overrides, "train.dtype=fp32"]
                results.append(run(config, args.data.resolve(), args.target, fp32, out))
                report(results[-1])
    return results


def report(r: dict) -> None:
    status = "reached" if r["reached"] else "NOT reached"
    print(
        f"{label(r)}: {status} val loss {r['val_loss']:.4f} at step {r['step']} in {r['wall_s']:.1f} s "
        f"wall (training loop {r['train_s']:.1f} s); evals {r['evals']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", type=Path, nargs="+", default=[BASELINE, SPEEDRUN])
    parser.add_argument("--target", type=float, default=1.90)
    parser.add_argument("--data", type=Path, default=REPO / "out" / "data" / "shakespeare-char")
    parser.add_argument(
        "--set", action="append", default=[], help="override for every config but the baseline"
    )
    parser.add_argument(
        "--no-fp32", action="store_true", help="skip the fp32 rerun of configs that resolve to bf16"
    )
    parser.add_argument("--json", type=Path, help="also write the machine and the results to this file")
    args = parser.parse_args()
    if clash := schedule_override(args.set):
        parser.error(f"--set {clash}: every run gets the same schedule ({SAME_SCHEDULE})")

    os.environ.setdefault("LMFORGE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    ensure_data(args.data)
    cpu = machine()
    print(
        f"CPU {cpu['model']} (family {cpu['family']}; flags: {cpu['flags'] or 'none of note'}; "
        f"torch capability {cpu['capability']}; native bf16: {cpu['native_bf16']}), {cpu['cpus']} cpus, "
        f"torch {cpu['torch']}; target val loss {args.target}",
        flush=True,
    )
    results = run_all(args)
    compared = ratios(results)
    for c in compared:
        print(f"ratio {c['run']} / {c['reference']}: {c['ratio']:.3f} ({1 / c['ratio']:.2f}x faster)")
    gains = precision_gains(results)
    for g in gains:
        print(
            f"{g['dtype']} alone: {g['config']} runs {g['speedup']:.2f}x faster in {g['dtype']} than in fp32"
        )
    if args.json:
        record = {"machine": cpu, "schedule": SAME_SCHEDULE, "results": results}
        record |= {"ratios": compared, "precision_gains": gains}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
