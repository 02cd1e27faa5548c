"""SST-2 dev accuracy of fine-tuned runs alone and of every ensemble of them (mean label probability).

Each run's best checkpoint (or a checkpoint folder given as such) scores the two labels after every
dev prompt, as `lmforge eval --task sst2` does (`choice_log_probs`); an ensemble averages the runs'
label probabilities. `--average-weights` also scores one model whose weights are the mean of all
the given checkpoints' (checkpoint averaging; they must share an architecture).

    .venv/bin/python benchmarks/sst2_ensemble.py runs/sst2-base-s1 runs/sst2-base-s2 runs/sst2-base-s3
    .venv/bin/python benchmarks/sst2_ensemble.py --average-weights runs/sst2-base-s1/checkpoints/step-*
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge import inference
from lmforge.tasks.base import choice_log_probs
from lmforge.tasks.sst2 import LABEL_CHOICES
from prepare_throughput import cpu_model  # a sibling script: benchmarks/ is sys.path[0]

CPU = torch.device("cpu")


def label_probs(model: torch.nn.Module, tokenizer: Tokenizer, records: list[dict]) -> torch.Tensor:
    """(examples, 2): the model's probability of each label, normalised over the two."""
    scores = [
        choice_log_probs(model, tokenizer, r["prompt"], choices=LABEL_CHOICES, device=CPU) for r in records
    ]
    return torch.softmax(torch.tensor(scores), dim=-1)


def load(run: Path) -> tuple[torch.nn.Module, Tokenizer]:
    """The run's best checkpoint (or the checkpoint folder itself) and its tokenizer."""
    model = inference.load(run, "best", "cpu").model
    return model, Tokenizer.from_file(str(run / "tokenizer.json"))


@torch.no_grad()
def weight_average(runs: list[Path]) -> tuple[torch.nn.Module, Tokenizer]:
    """The first run's model with every weight replaced by its mean over all the runs."""
    model, tokenizer = load(runs[0])
    others = [load(run)[0].state_dict() for run in runs[1:]]
    # means computed before any is loaded: a tied weight appears under two names, one tensor
    mean = {
        name: sum((o[name] for o in others), weight) / len(runs)
        for name, weight in model.state_dict().items()
    }
    model.load_state_dict(mean)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("out/tasks/sst2"), help="holds eval.jsonl (dev)")
    parser.add_argument("--average-weights", action="store_true", help="also score the mean of their weights")
    args = parser.parse_args()
    records = [json.loads(line) for line in (args.data / "eval.jsonl").open(encoding="utf-8")]
    labels = torch.tensor([r["label"] for r in records])
    probs = {str(run): label_probs(*load(run), records) for run in args.runs}
    print(f"{len(records)} examples, {cpu_model()}, torch {torch.__version__}")
    for size in range(1, len(probs) + 1):
        for names in itertools.combinations(probs, size):
            mean = sum(probs[n] for n in names) / size
            accuracy = (mean.argmax(dim=-1) == labels).float().mean().item()
            print(f"{' + '.join(names)}: {100 * accuracy:.2f}%")
    if args.average_weights:
        accuracy = (label_probs(*weight_average(args.runs), records).argmax(dim=-1) == labels).float().mean()
        print(f"weights averaged over {', '.join(map(str, args.runs))}: {100 * accuracy.item():.2f}%")


if __name__ == "__main__":
    main()
