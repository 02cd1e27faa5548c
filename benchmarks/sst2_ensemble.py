"""SST-2 dev accuracy of fine-tuned runs alone and of every ensemble of them (mean label probability).

Each run's best checkpoint scores the two labels after every dev prompt, as `lmforge eval --task
sst2` does (`choice_log_probs`); an ensemble averages the runs' label probabilities.

    .venv/bin/python benchmarks/sst2_ensemble.py runs/sst2-base-s1 runs/sst2-base-s2 runs/sst2-base-s3
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge import checkpoint as ckpt
from lmforge.tasks.base import choice_log_probs
from lmforge.tasks.sst2 import LABEL_CHOICES
from prepare_throughput import cpu_model  # a sibling script: benchmarks/ is sys.path[0]


def label_probs(run: Path, records: list[dict]) -> torch.Tensor:
    """(examples, 2): the run's probability of each label, normalised over the two."""
    cpu = torch.device("cpu")
    model = ckpt.load_for_inference(run, "best", cpu).model.eval()
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    scores = [choice_log_probs(model, tokenizer, r["prompt"], LABEL_CHOICES, cpu) for r in records]
    return torch.softmax(torch.tensor(scores), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("out/tasks/sst2"), help="holds eval.jsonl (dev)")
    args = parser.parse_args()
    records = [json.loads(line) for line in (args.data / "eval.jsonl").open(encoding="utf-8")]
    labels = torch.tensor([r["label"] for r in records])
    probs = {str(run): label_probs(run, records) for run in args.runs}
    print(f"{len(records)} examples, {cpu_model()}, torch {torch.__version__}")
    for size in range(1, len(probs) + 1):
        for names in itertools.combinations(probs, size):
            mean = sum(probs[n] for n in names) / size
            accuracy = (mean.argmax(dim=-1) == labels).float().mean().item()
            print(f"{' + '.join(names)}: {100 * accuracy:.2f}%")


if __name__ == "__main__":
    main()
