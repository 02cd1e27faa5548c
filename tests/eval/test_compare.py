"""`lmforge compare`: a blind sheet made from two real checkpoints, judged by clicking through it in
headless Chromium, downloaded, and un-blinded by `--tally`; the statistics against known values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from playwright.sync_api import expect

from lmforge.errors import LmforgeError
from lmforge.eval.compare import read_prompts, sheet_html, sign_test, wilson_interval
from tests.conftest import random_char_run
from tests.test_bad_input import assert_one_line_error, usage_error

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 :.,!?'\"<>/&=()-\n"
HOSTILE = "</script><script>window.pwned = 1</script><b>bold</b> & <!-- comment"
PROMPTS = ["to be, or not", HOSTILE, "what light", "good morrow", "o romeo"]
# what the judge clicks on the sheet's cards, top to bottom
CLICKS = ["A", "B", "tie", "A", "A"]


def tiny_run(folder: Path, seed: int) -> Path:
    """A randomly initialised char model (different weights per seed) saved as a run."""
    run = folder / f"secret-run-name-{seed}"
    return random_char_run(run, ALPHABET, n_layer=1, d_model=16, block_size=128, seed=seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("compare-runs")
    return tiny_run(folder, 0), tiny_run(folder, 1)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def make(cli, runs: tuple[Path, Path], prompts: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(
        "compare",
        *runs,
        "--prompts",
        prompts,
        "--out",
        out,
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        *extra,
    )


# ----------------------------------------------------------------------------- statistics


def test_the_sign_test_is_the_exact_two_sided_binomial_test() -> None:
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 2**10)  # 0.021484375
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # 0.109375
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test(6, 0) == pytest.approx(0.03125)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0 and sign_test(3, 2) == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(0, 1), (7, 3), (12, 30), (50, 61), (100, 0)]:
        expected = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_the_wilson_interval_matches_hand_computed_values() -> None:
    # 8 of 10: p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416,
    # half-width 1.96 / 1.38416 * sqrt(0.016 + 0.0096040)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    low, high = wilson_interval(2.5, 5)  # ties counted half: a fractional count is fine
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


# ----------------------------------------------------------------------------- the prompts file


def test_prompts_are_lines_of_text_or_jsonl_prompts(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first prompt\n\n  \nsecond: <b>\r\n")
    assert [(p.text, p.line) for p in read_prompts(tmp_path / "p.txt")] == [
        ("first prompt", 1),
        ("second: <b>", 4),
    ]
    (tmp_path / "p.jsonl").write_text('{"prompt": "two\\nlines"}\n\n{"prompt": "x", "id": 7}\n')
    assert [(p.text, p.line) for p in read_prompts(tmp_path / "p.jsonl")] == [("two\nlines", 1), ("x", 3)]
    (tmp_path / "p.jsonl").rename(tmp_path / "P.JSONL")  # the suffix in any case
    assert [(p.text, p.line) for p in read_prompts(tmp_path / "P.JSONL")] == [("two\nlines", 1), ("x", 3)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "p.jsonl",
            b'{"prompt": "a"}\n{"text": "b"}\n',
            'p.jsonl:2: expected a JSON object with a "prompt" string',
        ),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "p.jsonl:2: not valid JSON"),
        ("p.jsonl", b'{"prompt": " "}\n', "p.jsonl:1: the prompt is empty"),
        ("p.jsonl", b'{"prompt": "\\ud800"}\n', "p.jsonl:1: the prompt holds a lone surrogate"),
        ("p.txt", b"fine\ncaf\xe9\n", "p.txt:2: invalid UTF-8 at byte 3 of the line"),
        ("p.txt", b"\n \n", "p.txt: no prompts (every line is blank)"),
    ],
    ids=["no-prompt-key", "bad-json", "empty", "surrogate", "latin-1", "blank"],
)
def test_a_bad_prompts_file_is_a_one_line_error_naming_file_and_line(
    cli, runs: tuple[Path, Path], tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    code, _, err = make(cli, runs, tmp_path / name, tmp_path / "out")
    assert_one_line_error(code, err, "compare", message)
    assert not (tmp_path / "out").exists()


def test_a_prompt_a_model_cannot_represent_names_the_line_and_the_run(
    cli, runs: tuple[Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "p.txt").write_text("fine\nUPPER CASE\n")
    code, _, err = make(cli, runs, tmp_path / "p.txt", tmp_path / "out")
    assert_one_line_error(
        code, err, "compare", "p.txt:2: ", f"{runs[0]}: --prompt has characters", "cannot represent"
    )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the sheet


def test_a_sheet_and_its_key_record_sides_seeds_and_answers_without_naming_a_run(
    cli, runs: tuple[Path, Path], prompts_file: Path, tmp_path: Path
) -> None:
    code, out, err = make(cli, runs, prompts_file, tmp_path / "cmp", "--seed", "7")
    assert code == 0, err
    assert f"5 prompts, 2 answers each -> {tmp_path / 'cmp' / 'sheet.html'}" in out
    key = json.loads((tmp_path / "cmp" / "key.json").read_text())
    assert key["runs"]["RUN_A"]["path"] == str(runs[0]) and key["runs"]["RUN_B"]["path"] == str(runs[1])
    assert key["sampling"] == {
        "max_new_tokens": 12,
        "temperature": 0.8,
        "top_k": 200,
        "top_p": None,
        "seed": 7,
        "chat": False,
        "device": "cpu",
        "dtype": "fp32",
    }
    assert [e["prompt"] for e in key["prompts"]] == PROMPTS
    assert [e["seed"] for e in key["prompts"]] == [7, 8, 9, 10, 11]
    sides = [(e["A"], e["B"]) for e in key["prompts"]]
    assert set(sides) == {("RUN_A", "RUN_B"), ("RUN_B", "RUN_A")}  # shuffled, and each run on each side
    assert sorted(a for a, _ in sides).count("RUN_A") in (2, 3)  # balanced: 5 prompts split 3/2
    page = (tmp_path / "cmp" / "sheet.html").read_text()
    for secret in [str(runs[0]), str(runs[1]), "secret-run-name", "RUN_A", "RUN_B", "checkpoints", "step-"]:
        assert secret not in page
    assert "http://" not in page and "https://" not in page and " src=" not in page  # self-contained
    assert key["sheet_id"] in page
    order = key["shown_order"]  # the sheet shows the prompts in a recorded random order
    assert sorted(order) == list(range(5)) and order != list(range(5))  # (seed 7 does move them)
    data = page.split('<script type="application/json" id="sheet-data">')[1].split("</script>")[0]
    assert [item["index"] for item in json.loads(data)["items"]] == order


def test_the_same_seed_gives_both_runs_the_same_random_stream(
    cli, runs: tuple[Path, Path], prompts_file: Path, tmp_path: Path
) -> None:
    """Compared with itself, a run gives the same answer on both sides (sampled, not greedy);
    with --chat the prompt goes through the chat template and the answers still match."""
    for extra in ([], ["--chat"]):
        out = tmp_path / f"self{len(extra)}"
        code, _, err = make(cli, (runs[0], runs[0]), prompts_file, out, "--temperature", "1.5", *extra)
        assert code == 0, err
        key = json.loads((out / "key.json").read_text())
        assert all(e["answers"]["RUN_A"] == e["answers"]["RUN_B"] for e in key["prompts"])
        assert len({e["answers"]["RUN_A"] for e in key["prompts"]}) > 1  # answers differ across prompts
        assert key["runs"]["RUN_A"]["chat_template"] == ("default" if extra else None)


def test_answer_length_defaults_to_what_fits_beside_a_chat_prompt(cli, tmp_path: Path) -> None:
    """128 tokens by default; through a chat template at most half the smaller context (here 64 of
    a 128-token context and 32 of a 64-token one, both runs alike): 128 would leave no room for the
    prompt. A plain continuation keeps 128 (it slides on past the context)."""
    small = random_char_run(tmp_path / "small", ALPHABET, n_layer=1, d_model=16, block_size=64)
    big = tiny_run(tmp_path, 0)
    (tmp_path / "p.txt").write_text("hi\n")
    for runs, extra, length in (
        ((small, big), ["--chat"], 32),
        ((big, big), ["--chat"], 64),
        ((small, big), [], 128),
    ):
        out = tmp_path / f"out-{len(extra)}-{length}"
        code, _, err = cli(
            "compare", *runs, "--prompts", tmp_path / "p.txt", "--out", out, "--device", "cpu", *extra
        )
        assert code == 0, err
        assert json.loads((out / "key.json").read_text())["sampling"]["max_new_tokens"] == length
    code, _, err = cli(
        "compare",
        small,
        big,
        "--prompts",
        tmp_path / "p.txt",
        "--out",
        tmp_path / "x",
        "--chat",
        "--max-new-tokens",
        "64",
    )
    assert_one_line_error(code, err, "compare", "--max-new-tokens 64 leaves no room for a prompt")


def test_an_existing_out_is_replaced_only_with_overwrite(
    cli, runs: tuple[Path, Path], prompts_file: Path, tmp_path: Path
) -> None:
    assert make(cli, runs, prompts_file, tmp_path / "cmp")[0] == 0
    code, _, err = make(cli, runs, prompts_file, tmp_path / "cmp", "--seed", "3")
    assert_one_line_error(code, err, "compare", "exists and is not empty; pass --overwrite")
    assert make(cli, runs, prompts_file, tmp_path / "cmp", "--seed", "3", "--overwrite")[0] == 0
    assert json.loads((tmp_path / "cmp" / "key.json").read_text())["sampling"]["seed"] == 3


def test_text_in_a_prompt_or_answer_is_shown_as_text_and_never_run(page, tmp_path: Path) -> None:
    items = [
        {
            "index": 0,
            "prompt": HOSTILE,
            "A": "<img src=x onerror='window.pwned=2'>",
            "B": "\u2028 &amp; ü 🙂",
        },
        {"index": 1, "prompt": "</SCRIPT >", "A": "<!--", "B": "<script>"},
    ]
    (tmp_path / "sheet.html").write_text(sheet_html("0123456789abcdef", items), encoding="utf-8")
    page.goto((tmp_path / "sheet.html").as_uri())
    assert page.evaluate("window.pwned") is None
    assert page.locator(".card").count() == 2
    assert page.locator(".card").nth(0).locator("pre.prompt").text_content() == HOSTILE
    answers = page.locator(".card").nth(0).locator(".answer pre")
    assert answers.all_text_contents() == [items[0]["A"], items[0]["B"]]
    assert page.locator(".card img, .card b, .card script").count() == 0
    assert page.locator(".card").nth(1).locator("pre").all_text_contents() == [
        "</SCRIPT >",
        "<!--",
        "<script>",
    ]


# ----------------------------------------------------------------------------- judging and the tally


def click_through(page, sheet: Path, clicks: list[str]) -> None:
    page.goto(sheet.as_uri())
    cards = page.locator(".card")
    expect(cards).to_have_count(len(clicks))
    expect(page.locator("#progress")).to_have_text(f"0 of {len(clicks)} judged")
    for n, choice in enumerate(clicks):
        cards.nth(n).locator(f'button[data-choice="{choice}"]').click()
    expect(page.locator("#progress")).to_have_text(f"{len(clicks)} of {len(clicks)} judged")


def download_judgments(page, to: Path) -> Path:
    with page.expect_download() as download:
        page.locator("#download").click()
    assert download.value.suggested_filename == "judgments.json"
    download.value.save_as(to)
    return to


def test_clicking_through_the_sheet_downloads_judgments_that_the_tally_unblinds(
    cli, page, runs: tuple[Path, Path], prompts_file: Path, tmp_path: Path
) -> None:
    assert make(cli, runs, prompts_file, tmp_path / "cmp")[0] == 0
    click_through(page, tmp_path / "cmp" / "sheet.html", CLICKS)
    page.reload()  # the choices survive a reload (localStorage, keyed by the sheet's id)
    # expect() waits for the page's script to restore them; a plain read raced it under -n auto
    expect(page.locator("#progress")).to_have_text("5 of 5 judged")
    expect(page.locator('button[aria-pressed="true"]')).to_have_count(len(CLICKS))
    assert (
        page.locator('button[aria-pressed="true"]').evaluate_all("bs => bs.map(b => b.dataset.choice)")
        == CLICKS
    )
    judgments = download_judgments(page, tmp_path / "judgments.json")

    key = json.loads((tmp_path / "cmp" / "key.json").read_text())
    clicked = dict(zip(key["shown_order"], CLICKS))  # prompt index -> the choice on its card
    winners = [clicked[i] if clicked[i] == "tie" else e[clicked[i]] for i, e in enumerate(key["prompts"])]
    wins, losses, ties = winners.count("RUN_A"), winners.count("RUN_B"), winners.count("tie")
    code, out, err = cli("compare", "--tally", tmp_path / "cmp", judgments, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["RUN_A"] == {"wins": wins, "losses": losses, "ties": ties}
    assert result["RUN_B"] == {"wins": losses, "losses": wins, "ties": ties}
    assert result["judged"] == result["prompts"] == 5
    assert result["win_rate"] == pytest.approx((wins + ties / 2) / 5)
    assert result["ci95"] == pytest.approx(list(wilson_interval(wins + ties / 2, 5)))
    assert result["sign_test_p"] == pytest.approx(sign_test(wins, losses))
    assert [j["winner"] for j in result["judgments"]] == winners

    code, out, _ = cli("compare", "--tally", tmp_path / "cmp", judgments)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"sheet {key['sheet_id']}: 5 of 5 prompts judged"
    assert lines[2].split()[:1] + lines[2].split()[2:] == ["RUN_A", str(wins), str(losses), str(ties)]
    assert f"win rate of RUN_A over RUN_B: {(wins + ties / 2) / 5:.3f} (ties count half)" in out
    assert f"sign test over {wins + losses} untied judgments" in out


def test_a_partly_judged_sheet_tallies_the_judged_prompts_only(
    cli, page, runs: tuple[Path, Path], prompts_file: Path, tmp_path: Path
) -> None:
    assert make(cli, runs, prompts_file, tmp_path / "cmp")[0] == 0
    page.goto((tmp_path / "cmp" / "sheet.html").as_uri())
    page.locator("#prompt-2").locator('button[data-choice="tie"]').click()  # prompt 2, wherever shown
    page.locator("#prompt-2").locator('button[data-choice="B"]').click()  # a change of mind
    expect(page.locator("#progress")).to_have_text("1 of 5 judged")
    judgments = json.loads(download_judgments(page, tmp_path / "j.json").read_text())
    assert judgments["judged"] == 1 and [j["choice"] for j in judgments["judgments"]] == [
        None,
        None,
        "B",
        None,
        None,
    ]
    code, out, err = cli("compare", "--tally", tmp_path / "cmp", tmp_path / "j.json", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["judged"] == 1 and result["prompts"] == 5
    key = json.loads((tmp_path / "cmp" / "key.json").read_text())
    assert result["judgments"] == [
        {"index": 2, "prompt": PROMPTS[2], "choice": "B", "winner": key["prompts"][2]["B"]}
    ]


@pytest.fixture
def sheet(tmp_path: Path) -> tuple[Path, str]:
    """A comparison folder with a hand-written key of 3 prompts (no model needed to tally)."""
    folder = tmp_path / "cmp"
    folder.mkdir()
    entries = [{"index": i, "prompt": f"p{i}", "A": "RUN_A", "B": "RUN_B"} for i in range(3)]
    runs = {"RUN_A": {"path": "runs/a"}, "RUN_B": {"path": "runs/b"}}
    (folder / "key.json").write_text(json.dumps({"sheet_id": "abc", "runs": runs, "prompts": entries}))
    return folder, "abc"


def judgments_with(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "judgments.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"sheet_id": "other", "judgments": []},
            "is for sheet 'other', but key.json here is for sheet 'abc'",
        ),
        ("{not json", "judgments.json: not valid JSON"),
        ([1, 2], 'expected a JSON object with a "judgments" list'),
        (
            {"sheet_id": "abc", "judgments": [{"index": 3, "choice": "A"}]},
            "judgment 1: index must be an integer in [0, 3)",
        ),
        ({"sheet_id": "abc", "judgments": [{"index": True, "choice": "A"}]}, "index must be an integer"),
        (
            {"sheet_id": "abc", "judgments": [{"index": 0, "choice": "left"}]},
            "choice must be one of A, B, tie or null",
        ),
        (
            {"sheet_id": "abc", "judgments": [{"index": 0, "choice": "A"}, {"index": 0, "choice": None}]},
            "judgment 2: prompt 0 is judged twice",
        ),
        ({"sheet_id": "abc", "judgments": [{"index": 0, "choice": None}]}, "no prompt is judged yet"),
    ],
    ids=[
        "other-sheet",
        "not-json",
        "not-object",
        "index-range",
        "index-bool",
        "choice",
        "twice",
        "none-judged",
    ],
)
def test_judgments_that_do_not_fit_the_sheet_are_a_one_line_error(
    cli, sheet: tuple[Path, str], tmp_path: Path, content: object, message: str
) -> None:
    code, _, err = cli("compare", "--tally", sheet[0], judgments_with(tmp_path, content))
    assert_one_line_error(code, err, "compare", message)


def test_tally_without_a_key_or_judgments_file_is_a_one_line_error(cli, sheet, tmp_path: Path) -> None:
    code, _, err = cli("compare", "--tally", tmp_path, tmp_path / "missing.json")
    assert_one_line_error(code, err, "compare", "is not a folder made by `lmforge compare` (no key.json)")
    code, _, err = cli("compare", "--tally", sheet[0], tmp_path / "missing.json")
    assert_one_line_error(code, err, "compare", "missing.json: no such file")


@pytest.mark.parametrize(
    "broken",
    [
        lambda key: key["prompts"][1].pop("A"),  # which run was A is lost
        lambda key: key["prompts"][1].update(B="RUN_A"),  # both sides the same run
        lambda key: key["prompts"][2].update(index=7),  # indexes not 0 .. n-1
        lambda key: key["prompts"][0].pop("prompt"),
        lambda key: key["runs"].pop("RUN_B"),
        lambda key: key["runs"]["RUN_A"].update(path=5),  # the table lines the paths up by their length
    ],
)
def test_a_damaged_key_is_a_one_line_error(cli, sheet, tmp_path: Path, broken) -> None:
    key = json.loads((sheet[0] / "key.json").read_text())
    broken(key)
    (sheet[0] / "key.json").write_text(json.dumps(key))
    judged = [{"index": i, "choice": "A"} for i in range(3)]
    judgments = judgments_with(tmp_path, {"sheet_id": "abc", "judgments": judged})
    code, _, err = cli("compare", "--tally", sheet[0], judgments)
    assert_one_line_error(code, err, "compare", "key.json: not a key written by `lmforge compare`")


def test_the_tally_counts_ties_half_and_reports_the_statistics(cli, sheet, tmp_path: Path) -> None:
    judged = [{"index": 0, "choice": "A"}, {"index": 1, "choice": "tie"}, {"index": 2, "choice": "A"}]
    code, out, err = cli(
        "compare", "--tally", sheet[0], judgments_with(tmp_path, {"sheet_id": "abc", "judgments": judged})
    )
    assert code == 0, err
    low, high = wilson_interval(2.5, 3)
    assert out.splitlines() == [
        "sheet abc: 3 of 3 prompts judged",
        "       run     wins  losses  ties",
        "RUN_A  runs/a     2       0     1",
        "RUN_B  runs/b     0       2     1",
        f"win rate of RUN_A over RUN_B: 0.833 (ties count half), 95% CI {low:.3f}-{high:.3f} (Wilson score)",
        "sign test over 2 untied judgments: p = 0.5 (two-sided, exact binomial)",
    ]
    assert math.isclose(sign_test(2, 0), 0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["only-one-run", "--prompts", "p", "--out", "o"],
            "give two runs, --prompts FILE and --out DIR (or --tally DIR JUDGMENTS)",
        ),
        (["a", "b", "--out", "o"], "give two runs, --prompts FILE and --out DIR (or --tally DIR JUDGMENTS)"),
        (["--tally", "d", "j", "--out", "o"], "--tally DIR JUDGMENTS takes no runs, --prompts or --out"),
    ],
)
def test_compare_usage_errors_are_one_line(cli, capsys, args: list[str], message: str) -> None:
    code, err = usage_error(cli, capsys, "compare", *args)
    assert code == 2 and err.splitlines()[-1] == f"lmforge compare: error: {message}"


def test_a_missing_run_is_a_one_line_error(cli, prompts_file: Path, tmp_path: Path) -> None:
    code, _, err = make(cli, (tmp_path / "nope", tmp_path / "nope2"), prompts_file, tmp_path / "out")
    assert_one_line_error(code, err, "compare", "no such run or checkpoint folder")


def test_an_lmforge_error_in_the_library_is_raised_not_printed(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    from lmforge.eval.compare import make_sheet
    from lmforge.inference import ModelSource
    from lmforge.inference.sampling import SamplingOptions

    (tmp_path / "p.txt").write_text("ok\n")
    options = SamplingOptions(8, 0.0, None, None)
    with pytest.raises(LmforgeError, match="--out .* exists and is not a folder"):
        (tmp_path / "file").write_text("x")
        make_sheet(
            (ModelSource(runs[0], "best", "cpu", "fp32"), ModelSource(runs[1], "best", "cpu", "fp32")),
            tmp_path / "p.txt",
            tmp_path / "file",
            options=options,
            seed=0,
            chat=False,
            overwrite=False,
        )
