"""`lmforge eval --task`: score a model on a task's eval.jsonl, beside a trivial baseline.

- sst2: the label whose verbalisation (" negative" / " positive") the model finds more
  likely after the prompt, not free generation; accuracy and macro-F1 vs the majority class.
- multi30k: decoded translations (greedy or beam search), sacreBLEU and chrF vs copying the source.
- squad: a decoded answer, official EM/F1 vs the context's first sentence.
- generate: decoded completions, ROUGE-1/2/L vs copying the prompt.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.data.tasks import SST2_LABELS
from lmforge.data.tokenizer import eot_id
from lmforge.errors import LmforgeError
from lmforge.eval import metrics
from lmforge.model.generate import beam_search

TASKS = ("sst2", "multi30k", "squad", "generate")


def read_eval(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise LmforgeError(f"{path}: not found (write it with `lmforge tasks prepare`)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise LmforgeError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if limit and len(records) == limit:
                break
    if not records:
        raise LmforgeError(f"{path}: no examples")
    return records


def _require(records: list[dict], fields: tuple[str, ...], path: Path) -> None:
    for i, record in enumerate(records, start=1):
        missing = [f for f in fields if f not in record]
        if missing:
            raise LmforgeError(f"{path}: example {i} lacks {', '.join(missing)}")


def _encode_prompt(tokenizer: Tokenizer, prompt: str, room: int) -> list[int]:
    return tokenizer.encode(prompt, add_special_tokens=False).ids[-room:]


@torch.inference_mode()
def choice_log_probs(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, choices: list[str], device: torch.device
) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the prompt."""
    block = model.config.block_size
    options = [tokenizer.encode(c, add_special_tokens=False).ids for c in choices]
    room = block + 1 - max(len(o) for o in options)
    context = _encode_prompt(tokenizer, prompt, room)
    rows = [context + o for o in options]
    width = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
    log_probs = torch.log_softmax(model(x.to(device))[0].float(), dim=-1)
    scores = []
    for i, option in enumerate(options):
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(option))
        scores.append(log_probs[i, positions, torch.tensor(option)].sum().item())
    return scores


def decode(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    beam_size: int,
    device: torch.device,
) -> str:
    """A completion that ends at <|endoftext|> or a newline (both end a completion in the task files)."""
    stops = {
        t for t in (eot_id(tokenizer), *tokenizer.encode("\n", add_special_tokens=False).ids) if t is not None
    }
    context = _encode_prompt(tokenizer, prompt, model.config.block_size - max_new_tokens)
    tokens = beam_search(model, torch.tensor([context], device=device), beam_size, max_new_tokens, stops)
    return tokenizer.decode(tokens).strip()


def first_sentence(prompt: str) -> str:
    context = prompt.split("Context:", 1)[-1].split("\nQuestion:")[0].strip()
    return re.split(r"(?<=[.!?])\s", context, maxsplit=1)[0]


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
    path = data_dir / "eval.jsonl"
    records = read_eval(path, limit)
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    result: dict = {"task": task, "examples": len(records), "data": str(path)}
    if task == "sst2":
        _require(records, ("prompt", "label"), path)
        labels = [r["label"] for r in records]
        if not set(labels) <= {0, 1}:
            raise LmforgeError(
                f"{path}: labels {sorted(set(labels) - {0, 1})} are outside the label set 0/1 "
                f"({', '.join(SST2_LABELS)})"
            )
        choices = [" " + name for name in SST2_LABELS]
        predictions = []
        for r in records:
            scores = choice_log_probs(model, tokenizer, r["prompt"], choices, device)
            predictions.append(max(range(len(choices)), key=scores.__getitem__))
        train = data_dir / "train.jsonl"
        majority_source = read_eval(train, None) if train.is_file() else records
        majority = Counter(r["label"] for r in majority_source).most_common(1)[0][0]
        result.update(
            model=metrics.accuracy_and_macro_f1(predictions, labels),
            baseline=metrics.accuracy_and_macro_f1([majority] * len(labels), labels),
            baseline_name=f"majority class ({SST2_LABELS[majority]})",
        )
        return result
    fields = {
        "multi30k": ("prompt", "source", "reference"),
        "squad": ("prompt", "answers"),
        "generate": ("prompt", "completion"),
    }[task]
    _require(records, fields, path)
    outputs = [decode(model, tokenizer, r["prompt"], max_new_tokens, beam_size, device) for r in records]
    result["samples"] = [{"prompt": r["prompt"][-200:], "output": o} for r, o in zip(records[:3], outputs)]
    result["decoding"] = f"beam {beam_size}" if beam_size > 1 else "greedy"
    if task == "multi30k":
        references = [r["reference"] for r in records]
        result.update(
            model=metrics.translation_scores(outputs, references),
            baseline=metrics.translation_scores([r["source"] for r in records], references),
            baseline_name="copy the source sentence",
        )
    elif task == "squad":
        answers = [r["answers"] for r in records]
        result.update(
            model=metrics.squad_scores(outputs, answers),
            baseline=metrics.squad_scores([first_sentence(r["prompt"]) for r in records], answers),
            baseline_name="the context's first sentence",
        )
    else:
        completions = [r["completion"].strip() for r in records]
        result.update(
            model=metrics.rouge_scores(outputs, completions),
            baseline=metrics.rouge_scores([r["prompt"] for r in records], completions),
            baseline_name="copy the prompt",
        )
    return result


def format_table(result: dict) -> str:
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
