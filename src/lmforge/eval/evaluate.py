"""`lmforge eval`: a checkpoint's loss over a whole held-out split, or its score on a task."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.loader import PreparedData
from lmforge.data.sft import SFTData, is_fine_tuning_data
from lmforge.data.tokenizer import check_same_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference import InferenceSession, ModelSource
from lmforge.inference.loss import LMEval, evaluate_lm
from lmforge.tasks import TASKS, evaluate_task, format_table


@dataclass(frozen=True)
class LMReport:
    """Loss, perplexity and bits per byte of a checkpoint over a data folder's held-out split."""

    checkpoint: Path
    step: int
    data_dir: Path
    result: LMEval

    def json_line(self) -> str:
        return json.dumps(
            {
                **self.result.as_dict(),
                "checkpoint": str(self.checkpoint),
                "step": self.step,
                "data": str(self.data_dir),
            }
        )

    def text(self) -> str:
        bpb = f", {self.result.bpb:.4f} bpb" if self.result.bpb else ""
        return (
            f"{self.checkpoint} (step {self.step}) on {self.data_dir} val: loss {self.result.loss:.4f}, "
            f"ppl {self.result.ppl:.3f}{bpb} over {self.result.tokens:,} tokens"
        )


@dataclass(frozen=True)
class TaskReport:
    """A checkpoint's task metrics beside the baseline's."""

    result: dict  # evaluate_task's result, then "checkpoint" and "step"

    def json_line(self) -> str:
        return json.dumps(self.result)

    def text(self) -> str:
        return format_table(self.result)


EvalReport = LMReport | TaskReport


def evaluate_checkpoint(
    source: ModelSource,
    *,
    task: str,
    data: Path | None,
    batch_size: int,
    limit: int | None,
    beam_size: int,
    max_new_tokens: int | None,
    predictions: Path | None = None,
    calibrate: bool = False,
) -> EvalReport:
    """Load the checkpoint of `source` (any head) and evaluate it on `data`
    (default: the run's data.dir): task "lm" is the loss over the held-out split, any registered
    task its metrics on DATA/eval.jsonl (`limit`, `beam_size`, `max_new_tokens` apply to tasks;
    None: what fits the model),
    with one JSON line per example written to `predictions` when given; `calibrate` scores label
    choices against a content-free input (sst2)."""
    if task == "lm":  # options of tasks, which the lm loss would otherwise ignore in silence
        _refuse_given(
            {
                "--predictions": predictions is not None,
                "--limit": limit is not None,
                "--beam-size": beam_size != 1,
                "--max-new-tokens": max_new_tokens is not None,
                "--calibrate": calibrate,
            }
        )
    if predictions is not None:
        check_predictions_file(predictions)
    session = source.load(any_head=True)
    if task == "lm":
        if not (data or session.config.data.dir):
            raise LmforgeError("--data is required: the checkpoint's config has no data.dir")
        data_dir = Path(data or session.config.data.dir)
        return LMReport(session.checkpoint, session.step, data_dir, _lm_loss(session, data_dir, batch_size))
    if TASKS[task].own_dataset:  # scored on its own dataset: --data only to point at another copy
        data_dir = data
    else:
        data_dir = Path(data or session.config.data.dir) if (data or session.config.data.dir) else None
    with session.autocast():
        result = evaluate_task(
            task,
            session.model,
            session.tokenizer,
            data_dir=data_dir,
            device=session.device,
            limit=limit,
            beam_size=beam_size,
            max_new_tokens=max_new_tokens,
            calibrate=calibrate,
            end_ids=session.end_ids,
        )
    lines = result.pop("predictions", None)
    if predictions is not None:
        if lines is None:
            raise LmforgeError(f"task {task!r} does not report per-example predictions")
        write_predictions(predictions, lines)
    return TaskReport({**result, "checkpoint": str(session.checkpoint), "step": session.step})


def _refuse_given(flags: dict[str, bool]) -> None:
    """A one-line error naming the task options given to the lm loss."""
    if wrong := [flag for flag, given in flags.items() if given]:
        raise LmforgeError(
            f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to a --task; "
            "the lm loss is over the whole val split and decodes nothing"
        )


def check_predictions_file(path: Path) -> None:
    """Refuse a path that holds anything but an earlier predictions file (whose first line is a JSON
    object with "id" and "prediction"): `--predictions` never replaces a file lmforge did not write."""
    if not path.exists():
        if not path.parent.is_dir():
            raise LmforgeError(f"--predictions {path}: the folder {path.parent} does not exist")
        return
    record = None
    if path.is_file():
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        try:
            record = json.loads(first)
        except ValueError:  # not JSON, or not UTF-8
            pass
    if not (isinstance(record, dict) and {"id", "prediction"} <= record.keys()):
        raise LmforgeError(f"--predictions {path}: exists and is not a predictions file; choose another path")


def write_predictions(path: Path, lines: list[dict]) -> None:
    """One JSON object per line, written beside `path` and renamed into place whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _lm_loss(session: InferenceSession, data_dir: Path, batch_size: int) -> LMEval:
    architecture = session.config.model
    if is_fine_tuning_data(data_dir):
        # Fine-tuning data: the loss of the val examples' completions, with the checkpoint's own
        # tokenizer, read as the run read its data (data.format, data.columns, the val split's seed)
        data = SFTData(
            data_dir,
            session.tokenizer_file,
            architecture.block_size,
            eval_only=True,
            chat_template=session.template,
            head=architecture.head,
            data=dataclasses.replace(session.config.data, dir=str(data_dir), hf="", pack=False),
        )
    elif architecture.head != "lm":
        raise LmforgeError(
            f"{session.checkpoint}: a {architecture.head} model has no language-model loss on {data_dir}; "
            "evaluate it on fine-tuning data (val.jsonl) or with --task"
        )
    else:
        data = PreparedData.open(data_dir)
        check_same_tokenizer(
            data_dir, data.tokenizer_file, session.tokenizer_file, source=f"checkpoint {session.checkpoint}"
        )
    return evaluate_lm(
        session.model,
        data.eval_batches(architecture.block_size, batch_size),
        session.device,
        autocast=session.autocast(),
        bytes_per_token=data.bytes_per_token("val"),
    )
