"""What `lmforge eval` prints for the loss of a checkpoint, as one JSON line or as text."""

import json
from pathlib import Path

from lmforge.eval.evaluate import LMReport, TaskReport
from lmforge.inference.loss import LMEval


def test_lm_report_as_json_and_as_text() -> None:
    report = LMReport(
        Path("run/ckpt"), 30, Path("data"), LMEval(loss=1.0, tokens=12_345, bytes_per_token=2.0)
    )
    assert json.loads(report.json_line()) == {
        **report.result.as_dict(),
        "checkpoint": "run/ckpt",
        "step": 30,
        "data": "data",
    }
    assert (
        report.text()
        == "run/ckpt (step 30) on data val: loss 1.0000, ppl 2.718, 0.7213 bpb over 12,345 tokens"
    )
    without_bytes = LMReport(Path("c"), 1, Path("d"), LMEval(loss=1.0, tokens=5, bytes_per_token=None))
    assert without_bytes.text() == "c (step 1) on d val: loss 1.0000, ppl 2.718 over 5 tokens"


def test_task_report_is_the_result_as_json_or_a_table() -> None:
    result = {
        "task": "sst2",
        "examples": 2,
        "data": "d/eval.jsonl",
        "model": {"accuracy": 1.0},
        "baseline": {"accuracy": 0.5},
        "baseline_name": "majority class (positive)",
        "checkpoint": "c",
        "step": 3,
    }
    report = TaskReport(result)
    assert report.json_line() == json.dumps(result)
    assert report.text().splitlines()[0] == "sst2: 2 examples from d/eval.jsonl"
    assert report.text().splitlines()[2] == f"{'accuracy':<16}{1.0:>12.4f}{0.5:>12.4f}"
