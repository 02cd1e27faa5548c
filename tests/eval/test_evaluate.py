"""What `lmforge eval` prints for the loss of a checkpoint, as one JSON line or as text."""

import json
from pathlib import Path

from lmforge.eval.evaluate import LMReport, TaskReport
from lmforge.inference.loss import LMEval
from tests.conftest import random_char_run


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


def test_data_whose_val_split_has_no_target_is_a_one_line_error(cli, tmp_path: Path) -> None:
    """One val token has no next token to predict: nothing to score, as training refuses it too."""
    run = random_char_run(tmp_path / "run", "abc", n_layer=1, d_model=16, block_size=8)
    (tmp_path / "text.txt").write_text("ab")
    data = tmp_path / "data"
    code, _, err = cli(
        "prepare", tmp_path / "text.txt", "--tokenizer", run, "--out", data, "--val-fraction", "0.5"
    )
    assert code == 0 and json.loads((data / "meta.json").read_text())["val_tokens"] == 1, err
    code, out, err = cli("eval", run, "--data", data)
    assert code == 1 and out == ""
    assert err == f"lmforge eval: error: {data}: the val split needs at least 2 tokens to evaluate\n"


def test_task_options_given_to_the_lm_loss_are_a_one_line_error(cli, tmp_path: Path) -> None:
    """--limit would suggest a loss over N examples; the lm loss is over the whole val split."""
    run = random_char_run(tmp_path / "run", "abc", n_layer=1, d_model=16, block_size=8)
    for options, named in [
        (["--limit", "3"], "--limit applies"),
        (["--beam-size", "2", "--calibrate"], "--beam-size, --calibrate apply"),
        (["--max-new-tokens", "4"], "--max-new-tokens applies"),
        (["--predictions", tmp_path / "p.jsonl"], "--predictions applies"),
    ]:
        code, out, err = cli("eval", run, "--data", tmp_path / "none", *options)
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"lmforge eval: error: {named} to a --task"), err
    assert not (tmp_path / "p.jsonl").exists()
