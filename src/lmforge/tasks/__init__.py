"""Tasks: `lmforge tasks prepare` writes a task's prompt/completion JSONL files from the shared
datasets, `lmforge eval --task` scores a model on them beside a trivial baseline.

Every module of this package that defines `TASK` (a `lmforge.tasks.base.Task`) is registered
in `TASKS`: a new task is one new file.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError
from lmforge.staging import staged_folder
from lmforge.tasks.base import EvalRun, Task, read_eval, require_fields

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


def prepare_task(
    name: str, out: Path, source_dir: Path | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Write the task's JSONL splits into `out`; return the number of examples per split."""
    from lmforge.data.sources import data_dir  # lmforge.data imports torch: keep the registry light

    known = tasks_with_datasets()
    if name not in known:
        raise LmforgeError(f"unknown task {name!r} (known: {', '.join(known)})")
    root = source_dir or data_dir()
    if root is None:
        raise LmforgeError("set $LMFORGE_DATA_DIR (or --data-dir) to the folder holding the shared datasets")
    counts = {}
    try:
        with staged_folder(out, "tasks", overwrite, [root]) as staging:
            for split, examples in TASKS[name].splits(root).items():
                with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    counts[split] = 0
                    for example in examples:
                        f.write(json.dumps(example, ensure_ascii=False) + "\n")
                        counts[split] += 1
    except FileNotFoundError as exc:
        raise LmforgeError(f"{exc.filename}: not found (is the data folder {root} complete?)") from None
    return counts


def evaluate_task(
    task: str,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    data_dir: Path,
    device: torch.device,
    limit: int | None = None,
    beam_size: int = 1,
    max_new_tokens: int = 64,
) -> dict:
    """{"task", "examples", "model": {metric: value}, "baseline": {metric: value}, "baseline_name", ...}."""
    if task not in TASKS:
        raise LmforgeError(f"unknown task {task!r} (known: {', '.join(TASKS)}, lm)")
    # Decoding keeps room in the context for at least one prompt token.
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    run = EvalRun(model, tokenizer, device, data_dir, beam_size, max_new_tokens)
    records = read_eval(run.eval_file, limit)
    require_fields(records, TASKS[task].fields, run.eval_file)
    header = {"task": task, "examples": len(records), "data": str(run.eval_file)}
    return {**header, **TASKS[task].evaluate(run, records)}


def format_table(result: dict) -> str:
    """`evaluate_task`'s result as a table: each metric of the model beside the baseline's."""
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
