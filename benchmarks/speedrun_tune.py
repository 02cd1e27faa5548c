"""Tune the speedrun recipe on a tuning split carved from the train split, never on val.

The last `--tune-tokens` tokens of the prepared train split (111,540 by default: as many as the val
split) become the tuning split's val, the rest its train; val.bin is never read. Each `--try` is one
`lmforge train` run of the recipe on that split, with its space-separated overrides and the same
schedule as benchmarks/speedrun.py's races (one eval and one checkpoint, at the end); the script
prints the tuning loss of each. The loss at a given step does not depend on the machine's load, so
this works on a busy machine; `--jobs` runs several tries at once, each on one thread.

    .venv/bin/python benchmarks/speedrun_tune.py --try "" --try "optim.muon_momentum=0.85"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from speedrun import REPO, SPEEDRUN, ensure_data, run

VAL_TOKENS = 111_540  # TinyShakespeare-char's val split


def tuning_split(data_dir: Path, tune_tokens: int, out: Path) -> Path:
    """A prepared folder `out`: `data_dir`'s train split less its last `tune_tokens`, which are the val."""
    meta = json.loads((data_dir / "meta.json").read_text())
    train = np.memmap(data_dir / "train.bin", dtype=meta["dtype"], mode="r")
    done = out / "meta.json"
    if done.is_file() and json.loads(done.read_text())["val_tokens"] == tune_tokens:
        return out
    out.mkdir(exist_ok=True)
    np.asarray(train[:-tune_tokens]).tofile(out / "train.bin")
    np.asarray(train[-tune_tokens:]).tofile(out / "val.bin")
    kept = len(train) - tune_tokens
    meta |= {"train_tokens": kept, "val_tokens": tune_tokens, "train_bytes": None, "val_bytes": None}
    meta["source"] = f"{meta.get('source')}: its train split, the last {tune_tokens} tokens held out"
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for name in ("tokenizer.json", ".lmforge"):
        if (data_dir / name).is_file():
            shutil.copyfile(data_dir / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=SPEEDRUN)
    parser.add_argument("--data", type=Path, default=REPO / "out" / "data" / "shakespeare-char")
    parser.add_argument("--tune-tokens", type=int, default=VAL_TOKENS)
    parser.add_argument("--split-dir", type=Path, help="where the tuning split goes (default: DATA-tune)")
    parser.add_argument(
        "--try", dest="tries", action="append", default=[], help='overrides, e.g. "train.max_steps=115"'
    )
    parser.add_argument("--jobs", type=int, default=1, help="tries at once, one thread each")
    args = parser.parse_args()

    os.environ.setdefault("LMFORGE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    ensure_data(args.data)
    data = args.data.resolve()
    split = tuning_split(data, args.tune_tokens, args.split_dir or data.with_name(f"{data.name}-tune"))
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # the `lmforge train` processes inherit it
    print(f"tuning split {split}; load {os.getloadavg()[0]:.1f}", flush=True)
    tries = args.tries or [""]
    with tempfile.TemporaryDirectory() as scratch:

        def one(i: int) -> str:
            overrides = tries[i].split()
            r = run(args.config, split, 0.0, overrides, Path(scratch) / str(i))
            return (
                f"tuning loss {r['val_loss']:.4f} at step {r['step']} ({r['wall_s']:.0f} s wall, "
                f"load {os.getloadavg()[0]:.1f}): {' '.join(overrides) or 'the recipe as it is'}"
            )

        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(one, range(len(tries))):
                print(line, flush=True)


if __name__ == "__main__":
    main()
