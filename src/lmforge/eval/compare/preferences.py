"""`lmforge compare --tally DIR JUDGMENTS.json --preferences OUT.jsonl`: a judge's blind choices as
preference pairs, the training data of train.objective = "dpo" or "simpo".

Each prompt judged A or B becomes one line in TRL's preference format: the winner's answer is
`chosen`, the loser's `rejected`. A sheet answered with `--chat` gives conversational pairs (the prompt
as a user message, each answer as an assistant message), so that the pairs are rendered with the chat
template the answers were sampled through; else plain strings, the answers being continuations of the
prompt. Ties say nothing about which answer is better and are dropped (counted), as are prompts left
unjudged. Each line also records which model wrote which side (`chosen_model`, `rejected_model`: RUN_A
or RUN_B, and their run folders), the sheet and the prompt's index.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.compare.make import KEY, MODELS
from lmforge.eval.compare.tally import Tally, _read_json


@dataclass(frozen=True)
class Preferences:
    """What `write_preferences` wrote: pairs, and the judged prompts it left out."""

    out: Path
    pairs: int
    ties: int  # dropped: a tie prefers neither answer
    unjudged: int  # prompts of the sheet without a choice

    def as_dict(self) -> dict:
        """What `--json` adds under "preferences"."""
        return {
            "out": str(self.out),
            "pairs": self.pairs,
            "ties_dropped": self.ties,
            "unjudged": self.unjudged,
        }

    def describe(self) -> str:
        return (
            f"{self.pairs} preference pairs -> {self.out} "
            f"({self.ties} ties dropped, {self.unjudged} prompts unjudged)"
        )


def preference_pairs(result: Tally, key: dict) -> list[dict]:
    """A line per prompt that one run won: its answer chosen, the other's rejected, both runs named."""
    entries = {e["index"]: e for e in key["prompts"]}
    sampling = key.get("sampling", {})
    if not isinstance(sampling, dict):  # the key is lmforge's; a hand-edited one is refused, not guessed
        raise LmforgeError(f"{KEY}: 'sampling' is not an object (a damaged key)")
    chat = bool(sampling.get("chat", False))
    pairs = []
    for outcome in result.outcomes:
        if outcome["winner"] == "tie":
            continue
        index, winner = outcome["index"], outcome["winner"]
        loser = MODELS[1 - MODELS.index(winner)]
        answers = entries[index].get("answers")
        if not isinstance(answers, dict) or not all(isinstance(answers.get(m), str) for m in MODELS):
            raise LmforgeError(f"{KEY}: prompt {index} has no answers of {' and '.join(MODELS)}")
        prompt, chosen, rejected = outcome["prompt"], answers[winner], answers[loser]
        if chat:  # TRL's conversational format: as the answers were sampled, through the chat template
            prompt = [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_model": winner,
                "rejected_model": loser,
                "chosen_run": result.runs[winner],
                "rejected_run": result.runs[loser],
                "sheet_id": result.sheet_id,
                "index": index,
            }
        )
    return pairs


def check_preferences_out(out: Path, *, inputs: tuple[Path, Path], overwrite: bool = False) -> None:
    """Refuse an OUT that is an input of the tally (key, judgments), exists (without --overwrite), or
    lies in no folder: checked before anything is tallied or written."""
    folder, judgments_file = inputs
    if out.resolve() in ((folder / KEY).resolve(), judgments_file.resolve()):
        raise LmforgeError(f"--preferences {out}: would overwrite an input of the tally")
    if out.exists() and not overwrite:
        raise LmforgeError(f"--preferences {out}: exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise LmforgeError(f"--preferences {out}: folder {out.parent} does not exist")


def write_preferences(result: Tally, folder: Path, out: Path) -> Preferences:
    """The preference pairs of a tally of `folder`'s sheet, written to `out` (JSONL) whole or not at all."""
    pairs = preference_pairs(result, _read_json(folder / KEY, f"{folder}: no {KEY}"))
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")  # renamed into place whole
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return Preferences(out, len(pairs), result.ties, result.total - result.judged)
