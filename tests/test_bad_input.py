"""Hostile or broken input through the command line: always one line on stderr and exit 1 (2 for
usage errors), never a traceback and never a silent wrong result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import Config, ModelConfig
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.model import GPT
from tests.conftest import TINY

DEEP_JSON = "[" * 200_000  # Python's json gives up with RecursionError long before
HUGE_INT = '{"text": ' + "7" * 5_000 + "}"  # past Python's int digit limit (ValueError, not JSONDecodeError)
ALPHABET = "abcdefghijklmnopqrstuvwxyz :,.!?\n"


def assert_one_line_error(code: int, err: str, verb: str, *parts: str) -> None:
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith(f"lmforge {verb}: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


def example_lines(n: int = 4) -> str:
    return "".join(json.dumps({"prompt": f"q{i}:", "completion": " yes"}) + "\n" for i in range(n))


@pytest.fixture
def sft_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "train.jsonl").write_text(example_lines())
    (folder / "val.jsonl").write_text(example_lines())
    char_tokenizer(ALPHABET + "0123456789", specials=[EOT]).save(str(folder / "tokenizer.json"))
    return folder


def finetune(cli, folder: Path, out: Path) -> tuple[int, str, str]:
    sets = [f"data.dir={folder}", f"data.tokenizer={folder / 'tokenizer.json'}", *TINY]
    return cli("finetune", "--out", out, *[arg for item in sets for arg in ("--set", item)])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (DEEP_JSON, "train.jsonl:3: JSON nested too deeply"),
        (HUGE_INT, "train.jsonl:3: JSON number has too many digits"),
        (b'{"prompt": "caf\xe9", "completion": " x"}', "train.jsonl:3: invalid UTF-8 at byte 15 of the line"),
    ],
    ids=["deep", "huge-int", "latin-1"],
)
def test_finetune_reports_a_hostile_line_by_file_and_line(
    cli, sft_folder: Path, tmp_path: Path, line: str | bytes, message: str
) -> None:
    raw = line if isinstance(line, bytes) else line.encode()
    lines = example_lines(2).encode() + raw + b"\n" + example_lines(2).encode()
    (sft_folder / "train.jsonl").write_bytes(lines)
    code, _, err = finetune(cli, sft_folder, tmp_path / "run")
    assert_one_line_error(code, err, "finetune", message)


def test_finetune_skips_a_hostile_line_when_asked(sft_folder: Path, capsys) -> None:
    from lmforge.data.sft import read_examples

    (sft_folder / "train.jsonl").write_bytes(
        example_lines(2).encode() + DEEP_JSON.encode() + b"\n\xff\xfe\n" + HUGE_INT.encode() + b"\n"
    )
    assert len(read_examples(sft_folder / "train.jsonl", "skip")) == 2
    assert "skipped 3 bad line(s)" in capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with one checkpoint of a tiny char model."""
    tokenizer = char_tokenizer(ALPHABET, specials=[EOT])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    m = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=32, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    ckpt.save_checkpoint(
        tmp_path / "run",
        1,
        GPT(m),
        state={},
        config=Config(model=m),
        tokenizer_file=tmp_path / "tokenizer.json",
        val_loss=1.0,
    )
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("line", "message"),
    [(DEEP_JSON, "eval.jsonl:2: not valid JSON (JSON nested too deeply)"), (HUGE_INT, "too many digits")],
    ids=["deep", "huge-int"],
)
def test_task_eval_reports_a_hostile_line(
    cli, run_dir: Path, tmp_path: Path, line: str, message: str
) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "eval.jsonl").write_text(json.dumps({"prompt": "a:", "completion": " b"}) + "\n" + line + "\n")
    code, _, err = cli("eval", run_dir, "--task", "generate", "--data", folder)
    assert_one_line_error(code, err, "eval", message)


@pytest.mark.parametrize(
    ("line", "message"),
    [(DEEP_JSON, "docs.jsonl:2: not valid JSON (JSON nested too deeply)"), (HUGE_INT, "too many digits")],
    ids=["deep", "huge-int"],
)
def test_prepare_reports_a_hostile_jsonl_line(cli, tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text(json.dumps({"text": "some text"}) + "\n" + line + "\n")
    code, _, err = cli("prepare", tmp_path / "in", "--tokenizer", "byte", "--out", tmp_path / "out", "-q")
    assert_one_line_error(code, err, "prepare", message)


def test_a_tokenizer_json_with_an_empty_vocabulary_is_refused(cli, tmp_path: Path) -> None:
    char_tokenizer("").save(str(tmp_path / "empty.json"))
    (tmp_path / "in.txt").write_text("some text\n" * 20)
    code, _, err = cli(
        "prepare", tmp_path / "in.txt", "--tokenizer", tmp_path / "empty.json", "--out", tmp_path / "o", "-q"
    )
    assert_one_line_error(code, err, "prepare", "empty.json: the tokenizer has an empty vocabulary")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-inf"), ("--top-p", "nan")],
)
def test_sample_refuses_non_finite_options(cli, run_dir: Path, option: str, value: str) -> None:
    code, out, err = cli("sample", run_dir, f"{option}={value}", "--max-new-tokens", "3")
    assert_one_line_error(code, err, "sample", option)
    assert out == ""


def usage_error(cli, capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli(*args)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "five"])
def test_export_refuses_a_shard_size_that_is_not_a_finite_positive_number(
    cli, capsys, run_dir: Path, tmp_path: Path, value: str
) -> None:
    code, err = usage_error(
        cli, capsys, "export", run_dir, "--out", tmp_path / "hf", f"--max-shard-size-gb={value}"
    )
    assert code == 2
    assert err.splitlines()[-1].startswith("lmforge export: error: argument --max-shard-size-gb: ")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("args", "verb", "message"),
    [
        (["prepare", "in.txt"], "prepare", "the following arguments are required: --out, --tokenizer"),
        (
            ["prepare", "in.txt", "--out", "o", "--tokenizer", "char", "--bogus"],
            "prepare",
            "unrecognized arguments: --bogus",
        ),
        (["tasks", "prepare", "sst2", "--out", "o", "-x"], "tasks prepare", "unrecognized arguments: -x"),
        (["sample", "run", "--top-k", "0"], "sample", "argument --top-k: must be at least 1, got 0"),
        (["serve", "run", "--threads", "0"], "serve", "argument --threads: must be at least 1, got 0"),
    ],
)
def test_usage_errors_print_the_verbs_usage_once_then_one_error_line(
    cli, capsys, args: list[str], verb: str, message: str
) -> None:
    code, err = usage_error(cli, capsys, *args)
    lines = err.splitlines()
    assert code == 2
    assert lines[0].startswith(f"usage: lmforge {verb} ") and err.count("usage:") == 1
    assert lines[-1] == f"lmforge {verb}: error: {message}"
    assert sum(": error: " in line for line in lines) == 1


def test_an_error_quoting_a_line_break_stays_on_one_line(cli) -> None:
    code, _, err = cli("estimate", "shakespeare-char", "--set", "model.n\nlayer=4")
    assert_one_line_error(code, err, "estimate", "unknown key model.n\\nlayer")


@pytest.mark.parametrize(
    ("args", "verb"),
    [
        (["sample", "run", "--seed", str(2**32)], "sample"),
        (["sample", "run", "--seed=-1"], "sample"),
        (["prepare", "in.txt", "--out", "o", "--tokenizer", "char", "--seed=-5"], "prepare"),
    ],
)
def test_seeds_outside_what_the_generators_take_are_usage_errors(
    cli, capsys, args: list[str], verb: str
) -> None:
    code, err = usage_error(cli, capsys, *args)
    assert code == 2
    assert err.splitlines()[-1].startswith(f"lmforge {verb}: error: argument --seed: must be in [0, 2**32)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature=nan"], "--temperature must be >= 0 and finite"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--max-new-tokens", "100000"], "--max-new-tokens 100000 leaves no room for a prompt"),
        (["--checkpoint", "nowhere"], "nowhere: not a checkpoint folder"),
    ],
)
def test_chat_refuses_bad_options_before_it_starts(cli, run_dir: Path, args: list[str], message: str) -> None:
    code, out, err = cli("chat", run_dir, *args)
    assert_one_line_error(code, err, "chat", message)
    assert out == ""


def test_a_batch_too_big_for_memory_is_one_line_naming_what_to_lower(
    cli, char_data: Path, tmp_path: Path
) -> None:
    # 10**12 windows: the batch's indices alone are 8 TB, which no allocator hands out
    sets = [f"data.dir={char_data}", *TINY, "train.max_steps=1", "train.batch_size=1000000000000"]
    code, _, err = cli("train", "--out", tmp_path / "run", *[arg for item in sets for arg in ("--set", item)])
    assert_one_line_error(code, err, "train", "out of memory", "train.batch_size", "lmforge estimate")
