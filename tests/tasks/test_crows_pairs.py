"""CrowS-Pairs: lm-evaluation-harness's crows_pairs_english numbers, checked against the same formulas
written out by hand on the small fixture (made-up pairs in the real file's columns)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from scipy.stats import binomtest

from lmforge.errors import LmforgeError
from lmforge.inference import ModelSource
from lmforge.tasks.base import sentence_log_likelihood
from lmforge.tasks.crows_pairs import read_pairs, wilson_interval
from tests.conftest import FIXTURE_DATA, random_char_run

PAIRS = FIXTURE_DATA / "crows-pairs" / "crows_pairs_anonymized.csv"


def rows() -> list[dict]:
    with open(PAIRS, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A random character model whose alphabet covers the fixture's sentences."""
    alphabet = "".join(sorted({c for r in rows() for c in r["sent_more"] + r["sent_less"]}))
    return random_char_run(tmp_path / "run", alphabet, n_layer=1, d_model=32, block_size=64)


def by_hand(model: torch.nn.Module, tokenizer, text: str) -> float:
    """log p(text | <|endoftext|>): one forward pass over the whole sentence, summed by a loop."""
    ids = [tokenizer.token_to_id("<|endoftext|>")] + tokenizer.encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), dim=-1)
    return sum(float(log_probs[i, token]) for i, token in enumerate(ids[1:]))


def test_the_scores_are_the_harness_formulas_computed_by_hand(cli, run: Path, tmp_path: Path) -> None:
    session = ModelSource(run).load()
    expected = [(by_hand(session.model, session.tokenizer, r["sent_more"]),
                 by_hand(session.model, session.tokenizer, r["sent_less"])) for r in rows()]  # fmt: skip
    predictions = tmp_path / "pairs.jsonl"
    code, out, err = cli(
        "eval", run, "--task", "crows-pairs", "--data", PAIRS, "--json", "--predictions", predictions
    )
    assert code == 0, err
    result = json.loads(out)
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    scored = [value for p in lines for value in (p["loglik_more"], p["loglik_less"])]
    assert scored == pytest.approx([value for pair in expected for value in pair], abs=1e-4)
    # pct_stereotype: share of pairs whose sent_more is strictly more likely, direction ignored
    hits = [more > less for more, less in expected]
    assert result["model"]["pct_stereotype"] == pytest.approx(100 * sum(hits) / len(hits))
    assert result["model"]["likelihood_diff"] == pytest.approx(
        sum(abs(m - s) for m, s in expected) / len(expected), abs=1e-4
    )
    ci = binomtest(sum(hits), len(hits)).proportion_ci(0.95, method="wilson")
    assert result["model"]["pct_stereotype_ci95"] == pytest.approx([100 * ci.low, 100 * ci.high])
    for kind, summary in result["by_bias_type"].items():
        mine = [h for h, r in zip(hits, rows()) if r["bias_type"] == kind]
        assert summary["pairs"] == len(mine) and summary["pct_stereotype"] == pytest.approx(
            100 * sum(mine) / len(mine)
        )
    assert sum(s["pairs"] for s in result["by_bias_type"].values()) == result["examples"] == len(rows())
    assert [p["id"] for p in lines] == [r[""] for r in rows()] and lines[0]["bias_type"] == rows()[0][
        "bias_type"
    ]
    assert all(p["prediction"] == ("sent_more" if h else "sent_less") for p, h in zip(lines, hits))


def test_the_table_gives_every_bias_type_with_its_interval(cli, run: Path) -> None:
    code, out, err = cli("eval", run, "--task", "crows-pairs", "--data", PAIRS.parent)
    assert code == 0, err
    assert "crows_pairs_english" in out and "Blodgett" in out and "95% CI (Wilson)" in out
    for kind in {r["bias_type"] for r in rows()}:
        assert any(line.startswith(kind) for line in out.splitlines())


def test_by_default_the_pinned_dataset_is_scored(cli, run: Path, monkeypatch, tmp_path: Path) -> None:
    # LMFORGE_DATA_DIR holds the shared data (or the small copies, pinned to themselves).
    code, out, err = cli("eval", run, "--task", "crows-pairs", "--limit", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["data"].endswith("crows-pairs/crows_pairs_anonymized.csv")
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "nothing"))
    code, _, err = cli("eval", run, "--task", "crows-pairs")
    assert code == 1 and "LMFORGE_OFFLINE=1 forbids downloading it" in err and err.count("\n") == 1


def test_a_sentence_longer_than_the_block_is_scored_in_windows(run: Path) -> None:
    session = ModelSource(run).load()
    model, tokenizer = session.model, session.tokenizer
    text = " ".join(r["sent_more"] for r in rows())[:200]  # 201 tokens with <|endoftext|>; the block is 64
    ids = [tokenizer.token_to_id("<|endoftext|>")] + tokenizer.encode(text, add_special_tokens=False).ids
    total, first = 0.0, 1
    with torch.no_grad():
        while first < len(ids):  # targets ids[first:end], each window ending just before `end`
            end = min(len(ids), first + 64)
            window = ids[max(0, end - 65) : end - 1]
            log_probs = torch.log_softmax(model(torch.tensor([window]))[0][0].double(), dim=-1)
            offset = len(window) - (end - first)
            total += sum(float(log_probs[offset + i, t]) for i, t in enumerate(ids[first:end]))
            first = end
    assert sentence_log_likelihood(model, tokenizer, text, device=torch.device("cpu")) == pytest.approx(
        total, abs=1e-3
    )
    short = rows()[0]["sent_more"]
    assert sentence_log_likelihood(model, tokenizer, short, device=torch.device("cpu")) == pytest.approx(
        by_hand(model, tokenizer, short), abs=1e-4
    )


def test_pairs_the_tokenizer_cannot_represent_are_skipped_and_counted(cli, tmp_path: Path) -> None:
    alphabet = "".join(sorted({c for r in rows() for c in r["sent_more"] + r["sent_less"]} - {"v"}))
    run = random_char_run(tmp_path / "run", alphabet, n_layer=1, d_model=32, block_size=64)
    with_v = sum("v" in r["sent_more"] + r["sent_less"] for r in rows())
    assert with_v > 0
    code, out, err = cli("eval", run, "--task", "crows-pairs", "--data", PAIRS, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["skipped_pairs"] == with_v and result["model"]["pairs"] == len(rows()) - with_v


def test_wilson_interval_matches_the_textbook_formula() -> None:
    for hits, n in [(0, 10), (7, 10), (1290, 1508), (60, 60)]:
        ci = binomtest(hits, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(hits, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_a_file_without_crows_pairs_columns_is_a_one_line_error(cli, run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\na,1\n")
    code, _, err = cli("eval", run, "--task", "crows-pairs", "--data", bad)
    assert code == 1 and "not a CrowS-Pairs file (no column sent_more" in err and err.count("\n") == 1
    with pytest.raises(LmforgeError, match="no pairs"):
        header = PAIRS.read_text().splitlines()[0]
        (tmp_path / "empty.csv").write_text(header + "\n")
        read_pairs(tmp_path / "empty.csv", None)


def test_json_stays_json_when_a_bias_type_has_a_single_pair(cli, run: Path) -> None:
    def no_nan(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    code, out, err = cli("eval", run, "--task", "crows-pairs", "--data", PAIRS, "--limit", "1", "--json")
    assert code == 0, err
    result = json.loads(out, parse_constant=no_nan)  # strict JSON: jq and JSON.parse refuse NaN
    # one pair has no standard error: no interval, rather than [NaN, NaN]
    assert result["model"]["pairs"] == 1 and result["model"]["likelihood_diff_ci95"] is None
    assert result["model"]["likelihood_diff"] >= 0


def test_a_file_that_is_not_valid_csv_is_a_one_line_error(cli, run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"  # a field past the csv module's 128 KiB limit
    bad.write_text('sent_more,sent_less,stereo_antistereo,bias_type\n"' + "a" * 200_000 + '",b,stereo,race\n')
    # the limit is the process's: reading fine-tuning CSV (data.records) raises it, in this worker too
    before = csv.field_size_limit(128 * 1024)
    try:
        code, _, err = cli("eval", run, "--task", "crows-pairs", "--data", bad)
    finally:
        csv.field_size_limit(before)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"lmforge eval: error: {bad}: not valid CSV near line 2")


def test_a_byte_order_mark_is_no_part_of_the_first_columns_name(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte order mark: the ids (the unnamed first column) stay."""
    lines = PAIRS.read_text(encoding="utf-8").splitlines(keepends=True)
    renumbered = lines[0] + "".join(f"10{line}" for line in lines[1:6])  # ids 100..104, not row numbers
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + renumbered.encode())
    assert [row["id"] for row in read_pairs(marked, None)] == ["100", "101", "102", "103", "104"]
