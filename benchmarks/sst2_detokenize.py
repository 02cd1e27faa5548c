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

from lmforge.tasks.sst2 import sst2_prompt

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
    if missing := [s for s in ("train", "val", "eval") if not (args.source / f"{s}.jsonl").is_file()]:
        parser.error(
            f"{args.source}: no {missing[0]}.jsonl (give a folder from `lmforge tasks prepare sst2`)"
        )
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder")
    args.out.mkdir(parents=True)
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
                record["prompt"] = sst2_prompt(detokenize(review.group(1)))
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{split}: {len(records)} reviews")


if __name__ == "__main__":
    main()
