"""`lmforge compare --tally DIR JUDGMENTS.json`: un-blind a judge's choices with DIR/key.json and
report who won.

Conventions: the win rate is RUN_A's over RUN_B, `(wins + ties / 2) / judged`; its 95% interval
is the Wilson score interval of that rate over the judged prompts (ties count half a win there
too, which makes the interval a little wider than the ties' smaller variance needs); the sign
test is the two-sided exact binomial test of RUN_A's wins among the untied judgments against
p = 1/2. Prompts left unjudged (choice null) are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.compare.make import KEY, MODELS
from lmforge.eval.compare.sheet import CHOICES
from lmforge.jsonl import loads
from lmforge.stats import wilson_interval


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability, under p = 1/2, of a split at least as uneven
    as `wins` against `losses` (ties left out beforehand). 1.0 when there is nothing to test."""
    n, k = wins + losses, min(wins, losses)
    if n == 0 or wins == losses:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Tally:
    """The un-blinded result: RUN_A's wins, losses and ties against RUN_B, and the statistics."""

    sheet_id: str
    runs: dict[str, str]  # RUN_A/RUN_B -> path
    total: int  # prompts on the sheet
    wins: int
    losses: int
    ties: int
    outcomes: list[dict]  # per judged prompt: index, prompt, winner (RUN_A, RUN_B or tie)

    @property
    def judged(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float:
        return (self.wins + self.ties / 2) / self.judged

    def as_dict(self) -> dict:
        low, high = wilson_interval(self.wins + self.ties / 2, self.judged)
        return {
            "sheet_id": self.sheet_id,
            "runs": self.runs,
            "prompts": self.total,
            "judged": self.judged,
            "RUN_A": {"wins": self.wins, "losses": self.losses, "ties": self.ties},
            "RUN_B": {"wins": self.losses, "losses": self.wins, "ties": self.ties},
            "win_rate": self.win_rate,
            "ci95": [low, high],
            "ci_method": "wilson",
            "untied": self.wins + self.losses,
            "sign_test_p": sign_test(self.wins, self.losses),
            "judgments": self.outcomes,
        }

    def text(self) -> str:
        d = self.as_dict()
        (low, high), width = d["ci95"], max(len(path) for path in self.runs.values())
        rows = [f"{'':5}  {'run':{width}}  wins  losses  ties"]
        for name in MODELS:
            wins, losses, ties = d[name]["wins"], d[name]["losses"], d[name]["ties"]
            rows.append(f"{name}  {self.runs[name]:{width}}  {wins:4}  {losses:6}  {ties:4}")
        return "\n".join(
            [
                f"sheet {self.sheet_id}: {self.judged} of {self.total} prompts judged",
                *rows,
                f"win rate of RUN_A over RUN_B: {self.win_rate:.3f} (ties count half), "
                f"95% CI {low:.3f}-{high:.3f} (Wilson score)",
                f"sign test over {d['untied']} untied judgments: p = {d['sign_test_p']:.4g} "
                "(two-sided, exact binomial)",
            ]
        )


def tally(folder: Path, judgments_file: Path) -> Tally:
    """Check that `judgments_file` was downloaded from the sheet in `folder`, and un-blind it."""
    key = _read_json(folder / KEY, f"{folder} is not a folder made by `lmforge compare` (no {KEY})")
    try:
        entries = {e["index"]: e for e in key["prompts"]}
        runs = {name: key["runs"][name]["path"] for name in MODELS}
        sheet_id = key["sheet_id"]
        if (
            sorted(entries) != list(range(len(entries)))
            or any(
                sorted((e["A"], e["B"])) != sorted(MODELS) or not isinstance(e["prompt"], str)
                for e in entries.values()
            )
            or not all(isinstance(path, str) for path in runs.values())
        ):
            raise KeyError("prompts")
    except (KeyError, TypeError):
        raise LmforgeError(f"{folder / KEY}: not a key written by `lmforge compare`") from None
    choices = read_judgments(judgments_file, sheet_id, len(entries))
    counts = {"RUN_A": 0, "RUN_B": 0, "tie": 0}
    outcomes = []
    for index, choice in sorted(choices.items()):
        winner = "tie" if choice == "tie" else entries[index][choice]
        counts[winner] += 1
        outcomes.append(
            {"index": index, "prompt": entries[index]["prompt"], "choice": choice, "winner": winner}
        )
    if not outcomes:
        raise LmforgeError(f"{judgments_file}: no prompt is judged yet (every choice is null)")
    return Tally(
        sheet_id=sheet_id,
        runs=runs,
        total=len(entries),
        wins=counts["RUN_A"],
        losses=counts["RUN_B"],
        ties=counts["tie"],
        outcomes=outcomes,
    )


def read_judgments(path: Path, sheet_id: str, total: int) -> dict[int, str]:
    """The judged prompts of a downloaded judgments.json, by index; checked against the sheet."""
    content = _read_json(path, f"{path}: no such file")
    if not isinstance(content, dict) or not isinstance(content.get("judgments"), list):
        raise LmforgeError(
            f'{path}: expected a JSON object with a "judgments" list (a download from the sheet)'
        )
    if content.get("sheet_id") != sheet_id:
        raise LmforgeError(
            f"{path} is for sheet {content.get('sheet_id')!r}, but {KEY} here is for sheet {sheet_id!r}"
        )
    choices: dict[int, str] = {}
    seen: set[int] = set()
    for n, judgment in enumerate(content["judgments"], 1):
        index = judgment.get("index") if isinstance(judgment, dict) else None
        choice = judgment.get("choice") if isinstance(judgment, dict) else None
        if type(index) is not int or not 0 <= index < total:
            raise LmforgeError(
                f"{path}: judgment {n}: index must be an integer in [0, {total}), got {index!r}"
            )
        if choice is not None and choice not in CHOICES:
            raise LmforgeError(f"{path}: judgment {n}: choice must be one of {', '.join(CHOICES)} or null")
        if index in seen:
            raise LmforgeError(f"{path}: judgment {n}: prompt {index} is judged twice")
        seen.add(index)
        if choice is not None:
            choices[index] = choice
    return choices


def _read_json(path: Path, missing: str) -> object:
    if not path.is_file():
        raise LmforgeError(missing)
    try:
        return loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LmforgeError(f"{path}: not valid JSON ({exc})") from None
