"""Rewrite a prepared SST-2 task folder with its reviews as prose, for a base pretrained on books.

GLUE's SST-2 text is lowercased and Penn-Treebank tokenized ("it 's", "does n't", "`` a '' ,"),
which the Gutenberg base never read; this undoes the tokenization (clitics, punctuation, quotes,
brackets) and capitalizes the first letter and the pronoun "I", so that fine-tuning starts from
text that looks like the base's. An experiment (benchmarks/RESULTS.md), not a converter option:
from the base, seed 1, it scored 79.93% against 81.08% on the text as GLUE gives it.

    .venv/bin/python benchmarks/sst2_detokenize.py out/tasks/sst2 out/tasks/sst2-detok
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REVIEW = re.compile(r"^Review: (.*)\nSentiment:$", re.DOTALL)  # as lmforge.tasks.sst2.sst2_prompt writes it
RULES = [
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)(?=\s|$)"), r"\1"),  # does n't -> doesn't
    (re.compile(r"`` ?(.*?) ?''"), r'"\1"'),
    (re.compile(r"` ?(.*?) ?'(?=\s|$)"), r"'\1'"),
    (re.compile(r"\( ?(.*?) ?\)"), r"(\1)"),
    (re.compile(r" (\.\.\.|[.,;:?!%])(?=[\s'\"]|$)"), r"\1"),
    (re.compile(r"\$ (?=\d)"), "$"),
    (re.compile(r"(?<!\S)i(?=\s|'|$)"), "I"),
]


def detokenize(text: str) -> str:
    """Penn-Treebank-tokenized, lowercased text as ordinary prose."""
    text = " ".join(text.split())
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text[:1].upper() + text[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a folder from `lmforge tasks prepare sst2`")
    parser.add_argument("out", type=Path, help="a new folder for the rewritten train/val/eval.jsonl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    for split in ("train", "val", "eval"):
        with (args.source / f"{split}.jsonl").open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        with (args.out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                review = REVIEW.match(record["prompt"])
                if review is None:
                    raise SystemExit(
                        f"{args.source / split}.jsonl: a prompt is not 'Review: ...\\nSentiment:'"
                    )
                record["prompt"] = f"Review: {detokenize(review.group(1))}\nSentiment:"
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{split}: {len(records)} reviews")


if __name__ == "__main__":
    main()
