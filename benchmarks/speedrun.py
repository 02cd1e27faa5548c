"""Wall time to a target validation loss on TinyShakespeare-char, whole process included.

Runs each config as its own `lmforge train` process with `train.stop_at_val_loss`, and
reports the wall time of the whole process (start-up, compile, evals, checkpoints), the
step and the full-split val loss at which the target was reached. By default it runs
nanoGPT's CPU recipe and lmforge's speedrun recipe in the same invocation and prints the
ratio, since this machine's speed drifts between runs.

    .venv/bin/python benchmarks/speedrun.py                       # both configs, target 1.90
    .venv/bin/python benchmarks/speedrun.py --configs configs/speedrun-shakespeare-char-cpu.toml \\
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
BASELINE = REPO / "configs" / "nanogpt-shakespeare-char-cpu.toml"
SPEEDRUN = REPO / "configs" / "speedrun-shakespeare-char-cpu.toml"


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


def run(config: Path, data_dir: Path, target: float, overrides: list[str], scratch: Path) -> dict:
    out = scratch / config.stem
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
    for item in overrides:
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
    return {
        "config": config.name,
        "wall_s": wall,
        "reached": final["val_loss"] <= target,
        "step": final["step"],
        "val_loss": final["val_loss"],
        "evals": [(e["step"], round(e["val_loss"], 4)) for e in evals],
        "train_s": steps[-1]["elapsed_s"],
    }


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
    parser.add_argument("--json", type=Path, help="also write the machine and the results to this file")
    args = parser.parse_args()

    os.environ.setdefault("LMFORGE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    ensure_data(args.data)
    cpu = machine()
    print(
        f"CPU {cpu['model']} (family {cpu['family']}; flags: {cpu['flags'] or 'none of note'}; "
        f"torch capability {cpu['capability']}; native bf16: {cpu['native_bf16']}), {cpu['cpus']} cpus, "
        f"torch {cpu['torch']}; target val loss {args.target}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for config in args.configs:
            overrides = [] if config.resolve() == BASELINE else args.set
            r = run(config, args.data.resolve(), args.target, overrides, Path(scratch))
            results.append(r)
            status = "reached" if r["reached"] else "NOT reached"
            print(
                f"{r['config']}: {status} val loss {r['val_loss']:.4f} at step {r['step']} "
                f"in {r['wall_s']:.1f} s "
                f"wall (training loop {r['train_s']:.1f} s); evals {r['evals']}",
                flush=True,
            )
    ratio = None
    if len(results) == 2 and all(r["reached"] for r in results):
        ratio = results[1]["wall_s"] / results[0]["wall_s"]
        print(
            f"ratio {results[1]['config']} / {results[0]['config']}: {ratio:.3f} "
            f"({results[0]['wall_s'] / results[1]['wall_s']:.2f}x faster)"
        )
    if args.json:
        record = {"machine": cpu, "results": results, "ratio": ratio}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
