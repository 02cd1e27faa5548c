"""Tasks: `lmforge tasks prepare` writes a task's prompt/completion JSONL files from the shared
datasets, `lmforge eval --task` scores a model on them beside a trivial baseline.

Every module of this package that defines `TASK` (a `lmforge.tasks.base.Task`) is registered
in `TASKS`: a new task is one new file.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError
from lmforge.staging import staged_folder
from lmforge.tasks.base import DecodingTask, EvalRun, Task, read_eval, require_fields

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer


def _discover() -> dict[str, Task]:
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        task = getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "TASK", None)
        if isinstance(task, Task):
            found.append(task)
    return {task.name: task for task in sorted(found, key=lambda task: (task.listing_order, task.name))}


TASKS: dict[str, Task] = _discover()


def tasks_with_datasets() -> tuple[str, ...]:
    """The tasks `lmforge tasks prepare` can write from the shared datasets."""
    return tuple(name for name, task in TASKS.items() if task.has_dataset)


DEFAULT_VAL_FRACTION = 0.05  # of the train examples (or groups) carved out as val.jsonl
DEFAULT_MAX_NEW_TOKENS = 64  # a decoded answer's (or a span's) length cap, where the block allows


@dataclass(frozen=True)
class PreparedTask:
    """What `prepare_task` wrote: examples per file (train, val, eval) and where val.jsonl came from."""

    counts: dict[str, int]
    val_from: str  # e.g. "5% of train, seed 0" or "the dataset's validation split"
    train_from: str | None = None  # where the dataset offers a choice: which files train came from

    def summary(self, name: str, out: Path) -> str:
        counts = ", ".join(f"{n:,} {split}" for split, n in self.counts.items())
        train = f"train: {self.train_from}; " if self.train_from else ""
        return f"{name}: {counts} examples ({train}val: {self.val_from}; eval is the scored split) -> {out}"


def carve_validation(
    examples: Iterable[dict], fraction: float, seed: int, *, group: str | None = None
) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded choice of `fraction` of the examples (at least one) as val, in file order.

    With `group`, whole groups of examples sharing that field's value go to one side (e.g. SQuAD's
    articles, so that val questions are about contexts the model did not train on)."""
    examples = list(examples)
    keys = list(dict.fromkeys(e[group] if group else i for i, e in enumerate(examples)))
    if len(keys) < 2:
        raise LmforgeError(
            f"{len(keys)} training {'group' if group else 'example'}(s): too few to hold out val"
        )
    n_val = min(max(1, round(len(keys) * fraction)), len(keys) - 1)
    chosen = set(random.Random(seed).sample(keys, n_val))
    in_val = [(e[group] if group else i) in chosen for i, e in enumerate(examples)]
    return [e for e, v in zip(examples, in_val) if not v], [e for e, v in zip(examples, in_val) if v]


@dataclass(frozen=True)
class CorpusSource:
    """Where a `from_corpus` task (cloze) takes its text: `tasks prepare NAME --from CORPUS --examples N`."""

    corpus: str  # a named dataset, a text file or a folder
    examples: int | None = None  # at most this many examples over the three files; None: the task's default


def _with_validation(
    task: Task, root: Path | None, fraction: float, *, seed: int, source: CorpusSource | None
) -> tuple[dict[str, Iterable[dict]], PreparedTask]:
    """The task's splits in file order train, val, eval (val is the dataset's own, else carved from
    train), and a PreparedTask without counts that says where val and train came from."""
    splits = task.corpus_splits(source.corpus, source.examples, seed) if source else task.splits(root)
    train_from = splits.get("train_from")
    if "val" in splits:
        files = {"train": splits["train"], "val": splits["val"], "eval": splits["eval"]}
        return files, PreparedTask({}, "the dataset's validation split", train_from)
    train, val = carve_validation(splits["train"], fraction, seed, group=task.val_group)
    per = f" by {task.val_group}" if task.val_group else ""
    about = PreparedTask({}, f"{fraction:g} of train{per}, seed {seed}", train_from)
    return {"train": train, "val": val, "eval": splits["eval"]}, about


def prepare_task(
    name: str,
    out: Path,
    source_dir: Path | None = None,
    *,
    overwrite: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    corpus: CorpusSource | None = None,
) -> PreparedTask:
    """Write the task's train.jsonl, val.jsonl (checkpoint selection) and eval.jsonl (the scored split).

    val.jsonl is the dataset's own validation split where it has one, else a seeded `val_fraction`
    of the training examples, which train.jsonl then lacks. Only `lmforge eval --task` reads eval.jsonl.
    A `from_corpus` task (cloze) is made from `corpus` instead of the shared datasets.
    """
    from lmforge.data.sources import data_dir  # lmforge.data imports torch: keep the registry light

    known = tasks_with_datasets()
    if name not in known:
        raise LmforgeError(f"unknown task {name!r} (known: {', '.join(known)})")
    if not 0.0 < val_fraction < 1.0:
        raise LmforgeError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    _check_corpus(TASKS[name], corpus)
    root = source_dir  # None: $LMFORGE_DATA_DIR, then the cache, then a download (data.sources)
    inputs = [Path(corpus.corpus)] if corpus and Path(corpus.corpus).exists() else [root or data_dir()]
    counts = {}
    try:
        with staged_folder(out, "tasks", overwrite, inputs=[p for p in inputs if p is not None]) as staging:
            splits, about = _with_validation(TASKS[name], root, val_fraction, seed=seed, source=corpus)
            for split, examples in splits.items():
                with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    counts[split] = 0
                    for example in examples:
                        f.write(json.dumps(example, ensure_ascii=False) + "\n")
                        counts[split] += 1
    except FileNotFoundError as exc:
        raise LmforgeError(f"{exc.filename}: not found (is the data folder {root} complete?)") from None
    return PreparedTask(counts, about.val_from, about.train_from)


def write_task_text(
    name: str, out: Path, *, root: Path | None = None, prepared: Path | None = None, overwrite: bool = False
) -> int:
    """`lmforge tasks text`: write the text a task's recipe trains its tokenizer on to the file `out`
    (whole or not at all); the number of characters written."""
    if name not in TASKS:
        raise LmforgeError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    if out.exists() and not overwrite:
        raise LmforgeError(f"{out} exists (use --overwrite to replace it)")
    if out.is_dir():
        raise LmforgeError(f"{out} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    written = 0
    try:
        with open(partial, "w", encoding="utf-8", newline="") as f:
            for piece in TASKS[name].tokenizer_text(root, prepared):
                written += f.write(piece)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _check_corpus(task: Task, corpus: CorpusSource | None) -> None:
    """A corpus for the tasks made from one, and only for them."""
    if task.from_corpus and corpus is None:
        raise LmforgeError(f"task {task.name!r} is made from a text corpus: give --from CORPUS")
    if corpus is not None and not task.from_corpus:
        raise LmforgeError(f"--from and --examples apply to tasks made from a corpus, not to {task.name!r}")


def evaluate_task(
    task: str,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    data_dir: Path | None,
    device: torch.device,
    limit: int | None = None,
    beam_size: int = 1,
    max_new_tokens: int | None = None,
    calibrate: bool = False,
    end_ids: Sequence[int] = (),
) -> dict:
    """{"task", "examples", "data", "model": {metric: value}, ...}: most tasks score DATA_DIR/eval.jsonl
    beside a baseline ("baseline", "baseline_name"); an `own_dataset` task scores its dataset file.
    A decoded answer ends at a newline or one of `end_ids` (the session's), else <|endoftext|>."""
    if task not in TASKS:
        raise LmforgeError(f"unknown task {task!r} (known: {', '.join(TASKS)}, lm)")
    max_new_tokens = answer_cap(max_new_tokens, model.config.block_size)
    if calibrate and not TASKS[task].calibrates:
        raise LmforgeError(f"--calibrate applies to tasks that score label choices, not to {task!r}")
    if model.config.head == "span":
        if not isinstance(TASKS[task], DecodingTask):
            raise LmforgeError(
                f"a span model answers with a span of the prompt; task {task!r} scores choices"
            )
        if beam_size > 1:
            raise LmforgeError("--beam-size does not apply to a span model (it decodes nothing)")
    if TASKS[task].own_dataset:
        scored, records = TASKS[task].eval_records(data_dir, limit)
        data_dir = scored.parent
    elif data_dir is None:
        raise LmforgeError(f"task {task!r} needs --data: the checkpoint's config has no data.dir")
    run = EvalRun(
        model=model,
        tokenizer=tokenizer,
        device=device,
        data_dir=data_dir,
        beam_size=beam_size,
        max_new_tokens=max_new_tokens,
        calibrate=calibrate,
        end_ids=tuple(end_ids),
    )
    if not TASKS[task].own_dataset:
        scored, records = run.eval_file, read_eval(run.eval_file, limit)
        require_fields(records, TASKS[task].fields, scored)
    header = {"task": task, "examples": len(records), "data": str(scored)}
    return {**header, **TASKS[task].evaluate(run, records)}


def answer_cap(requested: int | None, block_size: int) -> int:
    """`--max-new-tokens`: by default DEFAULT_MAX_NEW_TOKENS, at most half the block (a decoded answer
    shares the context with its prompt); a given value must leave the prompt at least one token."""
    if requested is None:
        return max(1, min(DEFAULT_MAX_NEW_TOKENS, block_size // 2))
    if requested >= block_size:
        raise LmforgeError(
            f"--max-new-tokens {requested} leaves no room for a prompt in this model's block_size "
            f"{block_size}"
        )
    return requested


def format_table(result: dict) -> str:
    """`evaluate_task`'s result as a table: the task's own, else each metric of the model beside the
    baseline's."""
    if (own := TASKS[result["task"]].format_result(result)) is not None:
        return own
    lines = [
        f"{result['task']}: {result['examples']} examples from {result['data']}"
        + (f", {result['decoding']} decoding" if "decoding" in result else ""),
        f"{'metric':<16}{'model':>12}{'baseline':>12}   baseline: {result['baseline_name']}",
    ]
    for name, value in result["model"].items():
        if isinstance(value, float):
            lines.append(f"{name:<16}{value:>12.4f}{result['baseline'][name]:>12.4f}")
    lines += [f"{name}: {value}" for name, value in result["model"].items() if isinstance(value, str)]
    return "\n".join(lines)
