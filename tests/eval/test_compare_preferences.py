"""`lmforge compare --tally DIR JUDGMENTS --preferences OUT.jsonl`: blind judgments as preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.chat_template import ChatTemplate
from lmforge.data.preference import parse_pair


def sheet_folder(tmp_path: Path, *, chat: bool) -> Path:
    """A comparison folder with a key of 4 prompts: RUN_B shown as A on prompts 1 and 3."""
    folder = tmp_path / "cmp"
    folder.mkdir()
    entries = [
        {
            "index": i,
            "prompt": f"p{i}",
            **({"A": "RUN_B", "B": "RUN_A"} if i % 2 else {"A": "RUN_A", "B": "RUN_B"}),
            "answers": {"RUN_A": f"a{i}", "RUN_B": f"b{i}"},
        }
        for i in range(4)
    ]
    key = {
        "sheet_id": "abc",
        "runs": {"RUN_A": {"path": "runs/a"}, "RUN_B": {"path": "runs/b"}},
        "sampling": {"chat": chat},
        "prompts": entries,
    }
    (folder / "key.json").write_text(json.dumps(key))
    return folder


def judgments(tmp_path: Path, choices: list) -> Path:
    path = tmp_path / "judgments.json"
    judged = [{"index": i, "choice": c} for i, c in enumerate(choices)]
    path.write_text(json.dumps({"sheet_id": "abc", "judgments": judged}))
    return path


def test_won_prompts_become_pairs_that_name_who_wrote_each_side_and_ties_are_dropped(
    cli, tmp_path: Path
) -> None:
    folder = sheet_folder(tmp_path, chat=False)
    # prompt 0: side A (RUN_A) wins; 1: side A (RUN_B) wins; 2: tie; 3: unjudged
    code, out, err = cli(
        "compare", "--tally", folder, judgments(tmp_path, ["A", "A", "tie", None]), "--preferences",
        tmp_path / "prefs.jsonl",
    )  # fmt: skip
    assert code == 0, err
    assert (
        out.splitlines()[-1]
        == f"2 preference pairs -> {tmp_path / 'prefs.jsonl'} (1 ties dropped, 1 prompts unjudged)"
    )
    lines = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert lines == [
        {"prompt": "p0", "chosen": "a0", "rejected": "b0", "chosen_model": "RUN_A", "rejected_model": "RUN_B",
         "chosen_run": "runs/a", "rejected_run": "runs/b", "sheet_id": "abc", "index": 0},
        {"prompt": "p1", "chosen": "b1", "rejected": "a1", "chosen_model": "RUN_B", "rejected_model": "RUN_A",
         "chosen_run": "runs/b", "rejected_run": "runs/a", "sheet_id": "abc", "index": 1},
    ]  # fmt: skip
    code, out, _ = cli(
        "compare", "--tally", folder, tmp_path / "judgments.json", "--preferences", tmp_path / "prefs.jsonl",
        "--overwrite", "--json",
    )  # fmt: skip
    assert json.loads(out)["preferences"] == {
        "out": str(tmp_path / "prefs.jsonl"), "pairs": 2, "ties_dropped": 1, "unjudged": 1
    }  # fmt: skip


def test_a_chat_sheet_gives_conversational_pairs_that_training_reads(cli, tmp_path: Path) -> None:
    folder = sheet_folder(tmp_path, chat=True)
    out = tmp_path / "prefs.jsonl"
    assert cli("compare", "--tally", folder, judgments(tmp_path, ["B"]), "--preferences", out)[0] == 0
    (line,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert line["prompt"] == [{"role": "user", "content": "p0"}]
    assert line["chosen"] == [{"role": "assistant", "content": "b0"}] and line["chosen_model"] == "RUN_B"
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chosen, rejected = parse_pair(line, template)
    assert [s.text for s in chosen if s.assistant] == ["assistant: b0\n"]
    assert [s.text for s in rejected if s.assistant] == ["assistant: a0\n"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("exists", "exists (pass --overwrite to replace it)"),
        ("judgments", "would overwrite an input of the tally"),
        ("nofolder", "does not exist"),
    ],
)
def test_a_bad_preferences_file_is_a_one_line_error_and_nothing_is_touched(
    cli, tmp_path: Path, target: str, message: str
) -> None:
    folder = sheet_folder(tmp_path, chat=False)
    judged = judgments(tmp_path, ["A"])
    out = {"exists": tmp_path / "old.jsonl", "judgments": judged, "nofolder": tmp_path / "no" / "p.jsonl"}[
        target
    ]
    if target == "exists":
        out.write_text("keep me\n")
    before = judged.read_text()
    code, stdout, err = cli("compare", "--tally", folder, judged, "--preferences", out)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and stdout == ""
    assert judged.read_text() == before and (target != "exists" or out.read_text() == "keep me\n")


def test_preferences_without_tally_is_a_usage_error(cli, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("compare", "a", "b", "--prompts", "p", "--out", "o", "--preferences", "x.jsonl")
    assert exit_info.value.code == 2
    assert "--preferences OUT.jsonl goes with --tally DIR JUDGMENTS" in capsys.readouterr().err


def test_a_key_whose_sampling_is_not_an_object_is_a_one_line_error(cli, tmp_path: Path) -> None:
    folder = sheet_folder(tmp_path, chat=False)
    key = json.loads((folder / "key.json").read_text())
    (folder / "key.json").write_text(json.dumps(key | {"sampling": "chat"}))
    out = tmp_path / "pairs.jsonl"
    code, _, err = cli("compare", "--tally", folder, judgments(tmp_path, ["A"]), "--preferences", out)
    assert code == 1 and "'sampling' is not an object (a damaged key)" in err and err.count("\n") == 1, err
    assert not out.exists()
