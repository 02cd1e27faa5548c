"""benchmarks/dpo_sentiment.py end to end at toy size: pairs, runs, a table row per policy and the picture."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATASETS, random_char_run

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_dpo_sentiment_reports_reward_and_kl_of_every_policy(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sst2 = DATASETS.root / "sst2" / "train.tsv"
    alphabet = sorted(
        set(sst2.read_text(encoding="utf-8")) - {"\t"} | set("Review: \nSentiment: positive negative")
    )
    # one random character model stands for both the policy and the judge: the pipeline is what is tested
    (tmp_path / "model").mkdir()
    random_char_run(tmp_path / "model" / "run", "".join(alphabet), n_layer=1, d_model=16, block_size=64)
    figure = tmp_path / "reward-kl.png"
    run = str(tmp_path / "model" / "run")
    common = [sys.executable, str(BENCHMARKS / "dpo_sentiment.py"), "--policy", run, "--judge", run,
              "--sst2", str(sst2), "--out", str(tmp_path / "out"),
              "--tuning-prompts", "20", "--report-prompts", "3", "--betas", "0.1", "--steps", "2",
              "--max-new-tokens", "6"]  # fmt: skip
    # first the choice of the lr on the tuning prompts' val pairs alone: no report prompt is measured
    selection = subprocess.run(common + ["--select-lrs", "1e-3"], capture_output=True, text=True, timeout=600)
    assert selection.returncode == 0, selection.stderr[-3000:]
    chosen = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert [(r["lr"], r["step"]) for r in chosen] == [(1e-3, 1), (1e-3, 2)]
    assert 0.0 <= chosen[-1]["val_preference_accuracy"] <= 1.0
    assert not (tmp_path / "out" / "results.json").exists()
    result = subprocess.run(
        common + ["--figure", str(figure), "--best-of", "2", "4"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reused" in result.stdout  # the pairs the choice was made on
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    names = [r["policy"] for r in rows]
    assert names == ["reference", "best-of-2", "best-of-4", "dpo beta=0.1 step 1", "dpo beta=0.1 step 2",
                     "simpo beta=2 step 1", "simpo beta=2 step 2"]  # fmt: skip
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)
    assert rows[0]["kl"] == 0.0 and rows[4]["kl"] > 0.0  # the reference against itself; a tuned policy
    assert rows[1]["kl"] == pytest.approx(0.1931, abs=1e-4) and rows[2]["reward"] >= rows[1]["reward"]
    pairs = (tmp_path / "out" / "pairs" / "train.jsonl").read_text().splitlines()
    assert {"prompt", "chosen", "rejected"} <= json.loads(pairs[0]).keys()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "reference" in result.stdout
    # methods run by several processes: one table of the rows, each policy once
    merged = subprocess.run(
        [sys.executable, str(BENCHMARKS / "dpo_sentiment.py"), "--merge", str(tmp_path / "out"),
         str(tmp_path / "out"), "--out", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["rows"] == rows
