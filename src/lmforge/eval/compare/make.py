"""`lmforge compare RUN_A RUN_B`: both models answer every prompt; the answers go into a blind
sheet (sides shuffled) and a key that records which model is on which side."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmforge import __version__
from lmforge.chat.repl import Chat, Conversation
from lmforge.config import SEED_LIMIT
from lmforge.errors import LmforgeError
from lmforge.eval.compare.prompts import Prompt, read_prompts
from lmforge.eval.compare.sheet import sheet_html
from lmforge.inference import InferenceSession, ModelSource
from lmforge.inference.sampling import SamplingOptions
from lmforge.progress import progress_bar
from lmforge.staging import check_out, staged_folder

SHEET = "sheet.html"  # what the judge gets
KEY = "key.json"  # what un-blinds it: kept by whoever runs the comparison
MODELS = ("RUN_A", "RUN_B")  # the two runs, in command-line order
SIDES = ("A", "B")  # the two columns of the sheet
DEFAULT_MAX_NEW_TOKENS = 128  # an answer's length unless --max-new-tokens says (with --chat: what fits)


@dataclass(frozen=True)
class Answerer:
    """One model answering prompts: continuing them as text, or replying through its chat template."""

    session: InferenceSession
    chat: bool  # reply through the checkpoint's chat template; else continue the prompt as plain text

    def answer(self, prompt: str, options: SamplingOptions, seed: int) -> str:
        """The answer to `prompt`, sampled from a generator seeded with `seed`."""
        generator = torch.Generator(device=self.session.device).manual_seed(seed)
        if not self.chat:
            ids = self.session.prompt_ids(prompt)
            return "".join(self.session.complete(ids, options, generator))
        turns = [{"role": "user", "content": prompt}]
        chat = Chat(self.session, options, generator, io.StringIO(), Conversation(turns=turns))
        ids = chat.prompt_ids()
        return "".join(self.session.complete(ids, options, generator, end_of_turn=chat.end_of_turn)).strip()


@dataclass(frozen=True)
class SheetReport:
    """What `lmforge compare` made, for the one line it prints."""

    out: Path
    sheet_id: str
    prompts: int

    def describe(self) -> str:
        return (
            f"{self.prompts} prompts, 2 answers each -> {self.out / SHEET} (sheet {self.sheet_id}); "
            f"{self.out / KEY} un-blinds it: give the judge only {SHEET}"
        )


def make_sheet(
    sources: tuple[ModelSource, ModelSource],
    prompts_file: Path,
    out: Path,
    *,
    options: SamplingOptions,
    seed: int,
    chat: bool,
    overwrite: bool,
) -> SheetReport:
    """Answer every prompt of `prompts_file` with both runs' checkpoints (the same seed for both on a
    prompt) and write OUT/sheet.html and OUT/key.json. Input is checked before a model is loaded.
    Without `options.max_new_tokens` (None), answers get `answer_length`'s default."""
    prompts = read_prompts(prompts_file)
    runs = (sources[0].target, sources[1].target)
    inputs = (*runs, prompts_file)
    check_out(out, "compare", overwrite, inputs=inputs)
    answerers = [Answerer(source.load(), chat) for source in sources]
    options = replace(options, max_new_tokens=answer_length(answerers, options.max_new_tokens, chat))
    device, dtype = sources[0].device, sources[0].dtype  # as asked for both runs, recorded in the key
    answers = [
        _answers(answerers, runs, prompts_file, prompt=p, options=options, seed=_prompt_seed(seed, i))
        for i, p in enumerate(progress_bar(prompts, desc="answering", unit="prompt", leave=False))
    ]
    entries = _entries(prompts, answers, seed)
    order = _shown_order(len(entries), seed)
    items = [  # what the judge sees, in a random order: each answer by its side, nothing about the runs
        {"index": e["index"], "prompt": e["prompt"], **{side: e["answers"][e[side]] for side in SIDES}}
        for e in (entries[i] for i in order)
    ]
    sheet_id = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
    key = {
        "sheet_id": sheet_id,
        "lmforge_version": __version__,
        "runs": {name: _run_record(run, a) for name, run, a in zip(MODELS, runs, answerers)},
        "prompts_file": str(prompts_file),
        "sampling": {**asdict(options), "seed": seed, "chat": chat, "device": device, "dtype": dtype},
        "shuffle_seed": seed,
        "shown_order": order,  # the prompts' indexes as the sheet shows them, top to bottom
        "prompts": entries,
    }
    with staged_folder(out, "compare", overwrite, inputs=inputs) as folder:
        (folder / SHEET).write_text(sheet_html(sheet_id, items), encoding="utf-8")
        (folder / KEY).write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return SheetReport(out, sheet_id, len(prompts))


def answer_length(answerers: list[Answerer], requested: int | None, chat: bool) -> int:
    """`requested` tokens, else DEFAULT_MAX_NEW_TOKENS, which through a chat template is at most half
    the smaller context: the prompt must fit beside the answer (a plain continuation slides on past
    the context and needs no cap). Both runs answer at the same length, or the longer answer would be
    judged for its length."""
    if requested is not None or not chat:
        return requested or DEFAULT_MAX_NEW_TOKENS
    context = min(a.session.model.config.block_size for a in answerers)
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, context // 2))


def _entries(prompts: list[Prompt], answers: list[list[str]], seed: int) -> list[dict]:
    """The key's record of each prompt: its line and seed, which run is side A and which B, and
    both answers by run."""
    flipped = _shuffled_sides(len(prompts), seed)
    return [
        {
            "index": i,
            "line": p.line,
            "prompt": p.text,
            "seed": _prompt_seed(seed, i),
            **dict(zip(SIDES, MODELS[::-1] if flip else MODELS)),
            "answers": dict(zip(MODELS, pair)),
        }
        for i, (p, pair, flip) in enumerate(zip(prompts, answers, flipped))
    ]


def _run_record(run: Path, answerer: Answerer) -> dict:
    template = answerer.session.template
    return {
        "path": str(run),
        "checkpoint": str(answerer.session.checkpoint),
        "chat_template": None if not answerer.chat else "default" if template.is_default else "checkpoint",
    }


def _prompt_seed(seed: int, index: int) -> int:
    """The seed both models sample prompt `index` with."""
    return (seed + index) % SEED_LIMIT


def _answers(
    answerers: list[Answerer],
    runs: tuple[Path, Path],
    prompts_file: Path,
    *,
    prompt: Prompt,
    options: SamplingOptions,
    seed: int,
) -> list[str]:
    """Both runs' answers to one prompt; a prompt a run cannot take is an error naming file and line."""
    answers = []
    for answerer, run in zip(answerers, runs):
        try:
            answers.append(answerer.answer(prompt.text, options, seed))
        except LmforgeError as exc:
            raise LmforgeError(f"{prompts_file}:{prompt.line}: {run}: {exc}") from None
    return answers


def _shown_order(n: int, seed: int) -> list[int]:
    """The order the sheet shows the prompts in: seeded, and apart from the sides' random stream, so
    that a judge's fatigue or drift over the sheet does not follow the prompts file's order."""
    order = list(range(n))
    random.Random(f"order-{seed}").shuffle(order)
    return order


def _shuffled_sides(n: int, seed: int) -> list[bool]:
    """For each prompt, whether RUN_B is shown as A: half of the prompts (rounded at random), in a
    seeded random order, so that each run is on each side equally often."""
    rng = random.Random(seed)
    flips = [i % 2 == 1 for i in range(n)]
    if n % 2 and rng.random() < 0.5:  # the odd one out is on either side
        flips[-1] = True
    rng.shuffle(flips)
    return flips
