"""Fine-tuning throughput with and without packing (data.pack), in real tokens per second.

Two data sets, both read through `SFTData` as `lmforge finetune` reads them:

- sst2: the first --examples train examples of `lmforge tasks prepare sst2` (prompt/completion: a
  review and its label; short, 10 to 70 tokens);
- instruct: Alpaca-format records made from Multi30k's first --examples English/German training pairs
  ({"instruction": "Translate the sentence into German.", "input": EN, "output": DE}), rendered with
  Alpaca's prompt (`lmforge.data.sft.ALPACA_PROMPT`): an instruction-style set of mid-length examples
  with a long shared preamble.

Both use a byte-level BPE (vocab --vocab-size) trained on the examples. For each set and mode the
real training step (`lmforge.train.step.Stepper`) runs on the model of --n-layer/--d-model for
--seconds after --warmup steps; a mode's figure is the best of --repeats interleaved runs. Real tokens
are the positions that hold an example (padding excluded); unpacked batches are the usual
length-bucketed, padded ones (`ExampleBatches`).

    .venv/bin/python benchmarks/packing.py                 # needs LMFORGE_DATA_DIR (sst2, multi30k)
    .venv/bin/python benchmarks/packing.py --seconds 10 --examples 1000 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import tempfile
import time
from pathlib import Path

INSTRUCTION = "Translate the sentence into German."


def sst2_records(data_dir: Path, work: Path, n: int) -> list[dict]:
    from lmforge.tasks import prepare_task

    prepare_task("sst2", work / "sst2-task", data_dir)
    lines = (work / "sst2-task" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def instruct_records(data_dir: Path, n: int) -> list[dict]:
    def first(name: str) -> list[str]:
        with gzip.open(data_dir / "multi30k" / name, "rt", encoding="utf-8") as f:
            return [next(f).strip() for _ in range(n)]

    return [
        {"instruction": INSTRUCTION, "input": en, "output": de}
        for en, de in zip(first("train.en.gz"), first("train.de.gz"))
    ]


def open_data(records: list[dict], folder: Path, args: argparse.Namespace, *, pack: bool):
    """The records as `lmforge finetune` opens them (a single file: val carved from it)."""
    from lmforge.config import DataConfig
    from lmforge.data.sft import SFTData

    return SFTData(
        folder / "train.jsonl",
        folder / "tokenizer.json",
        args.block_size,
        data=DataConfig(val_fraction=0.01, pack=pack),
    )


def write_set(records: list[dict], folder: Path, vocab_size: int) -> None:
    from lmforge.data.sft import ALPACA_PROMPT
    from lmforge.data.tokenizer import train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [ALPACA_PROMPT] + [" ".join(str(v) for v in r.values()) for r in records]
    train_bpe(iter(texts), vocab_size).save(str(folder / "tokenizer.json"))


def measure(data, args: argparse.Namespace, *, pack: bool) -> dict:
    import torch

    from lmforge.config import ModelConfig, OptimConfig
    from lmforge.data.sft import ExampleBatches, collate
    from lmforge.model import GPT
    from lmforge.runtime import autocast, resolve_device, resolve_dtype
    from lmforge.train.optim import build_optimizers
    from lmforge.train.step import Stepper, StepSettings

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        block_size=args.block_size,
        vocab_size=data.vocab_size,
    )
    model = GPT(config).to(device)
    real = [0]

    def counting_collate(examples, max_length):
        real[0] += sum(len(e.ids) - 1 for e in examples)
        return collate(examples, max_length)

    batches = ExampleBatches(
        data.train, args.batch_size, 0, max_length=args.block_size, collate=counting_collate, pack=pack
    )
    stepper = Stepper(
        model,
        build_optimizers(model, OptimConfig()),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == "fp16"),
        amp=autocast(device, dtype) if dtype != "fp32" else contextlib.nullcontext(),
        device=device,
        settings=StepSettings(only_targets=True),
    )

    def step() -> tuple[int, int]:
        done = stepper.gradients(iter(lambda: _next_counted(batches, real, pack), None))
        stepper.update()
        return done.tokens

    for _ in range(args.warmup):
        step()
    real[0], padded, steps = 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        padded += step()
        steps += 1
    seconds = time.perf_counter() - start
    return {
        "pack": pack,
        "dtype": dtype,
        "steps": steps,
        "seconds": seconds,
        "real_tokens": real[0],
        "padded_tokens": padded,
        "real_tokens_per_s": real[0] / seconds,
        "fill": real[0] / max(padded, 1),
    }


def _next_counted(batches, real: list[int], pack: bool):
    batch = next(batches)
    if pack:
        real[0] += int((batch[2] >= 0).sum())
    return batch


def run_set(name: str, records: list[dict], work: Path, args: argparse.Namespace) -> dict:
    folder = work / name
    write_set(records, folder, args.vocab_size)
    data = {pack: open_data(records, folder, args, pack=pack) for pack in (False, True)}
    lengths = [len(e.ids) for e in data[False].train]
    best: dict[bool, dict] = {}
    for _ in range(args.repeats):
        for pack in (False, True):
            result = measure(data[pack], args, pack=pack)
            if pack not in best or result["real_tokens_per_s"] > best[pack]["real_tokens_per_s"]:
                best[pack] = result
    gain = best[True]["real_tokens_per_s"] / best[False]["real_tokens_per_s"]
    summary = data[True].summary
    print(
        f"{name}: {len(lengths)} examples, {sum(lengths) / len(lengths):.1f} tokens on average "
        f"(max {max(lengths)}); unpacked {best[False]['real_tokens_per_s']:,.0f} real tokens/s "
        f"(fill {best[False]['fill']:.2f}), packed {best[True]['real_tokens_per_s']:,.0f} "
        f"(fill {best[True]['fill']:.2f}): x{gain:.2f}",
        flush=True,
    )
    return {
        "set": name,
        "examples": len(lengths),
        "summary": summary,
        "unpacked": best[False],
        "packed": best[True],
        "gain": gain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per mode and repeat")
    parser.add_argument(
        "--warmup", type=int, default=20, help="steps first, unmeasured (kernel caches per shape)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sets", default="sst2,instruct")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("LMFORGE_DATA_DIR", "../shared/data"))
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        makers = {
            "sst2": lambda: sst2_records(data_dir, work, args.examples),
            "instruct": lambda: instruct_records(data_dir, args.examples),
        }
        for name in args.sets.split(","):
            results.append(run_set(name, makers[name](), work, args))
    report = {
        "machine": platform.processor() or platform.machine(),
        "args": vars(args) | {"json": None},
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
