"""Cloze (span-selection) questions made from a corpus: the blanked span is found elsewhere in the
context, the draw is seeded, the files load as fine-tuning data and stream any corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lmforge.data.sft import SFTData
from lmforge.data.tokenizer import byte_tokenizer
from lmforge.tasks.cloze import BLANK, cloze_example, paragraphs
from tests.conftest import use_gutenberg
from tests.tasks.conftest import CLOZE_BOOK, CLOZE_PARAGRAPHS, lines

PARAGRAPHS = CLOZE_PARAGRAPHS


def write_corpus(folder: Path, copies: int = 4) -> Path:
    """Several documents (files) of the known paragraphs, separated by blank lines."""
    folder.mkdir(parents=True)
    for n in range(copies):
        (folder / f"book{n}.txt").write_text(CLOZE_BOOK + "\n")
    return folder


def question_and_context(prompt: str) -> tuple[str, str]:
    question, context = prompt.split("\n")[:2]
    return question.removeprefix("Question: "), context.removeprefix("Context: ")


def test_the_blanked_span_is_in_another_sentence_of_the_context(cli, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    code, out, err = cli("tasks", "prepare", "cloze", "--from", corpus, "--out", tmp_path / "cloze")
    assert code == 0, err
    records = [r for split in ("train", "val", "eval") for r in lines(tmp_path / "cloze" / f"{split}.jsonl")]
    assert len(records) == 4 * len(PARAGRAPHS)  # one example per paragraph, all of them below the cap
    assert "cloze: 22 train, 1 val, 1 eval examples" in out
    for record in records:
        question, context = question_and_context(record["prompt"])
        span = record["answers"][0]
        assert record["completion"] == " " + span and span in PARAGRAPHS
        assert question.count(BLANK) == 1 and span in context
        assert question.replace(BLANK, span) not in context  # the question's sentence left the context
        at = record["answer_start"]  # the span's occurrence in the context, for a span head
        assert record["prompt"][at : at + len(span)] == span and at > record["prompt"].index("\nContext: ")
        assert record["prompt"].endswith(f"\nQuestion: {question}\nAnswer:")  # SQuAD's prompt


def test_the_draw_is_seeded_and_capped(cli, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", copies=10)

    def prepare(name: str, seed: int) -> list[str]:
        code, _, err = cli("tasks", "prepare", "cloze", "--from", corpus, "--examples", "12",
                           "--seed", seed, "--out", tmp_path / name)  # fmt: skip
        assert code == 0, err
        return [r["id"] for s in ("train", "val", "eval") for r in lines(tmp_path / name / f"{s}.jsonl")]

    first, again, other = prepare("a", 0), prepare("b", 0), prepare("c", 1)
    assert len(first) == 12 and first == again
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert set(first) != set(other)  # 12 of 60 paragraphs: another seed draws others


def test_cloze_files_load_as_fine_tuning_data(cli, tmp_path: Path) -> None:
    code, _, err = cli("tasks", "prepare", "cloze", "--from", write_corpus(tmp_path / "corpus"),
                       "--out", tmp_path / "cloze")  # fmt: skip
    assert code == 0, err
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    data = SFTData(tmp_path / "cloze", tmp_path / "tokenizer.json", block_size=256)
    assert (len(data.train), len(data.val)) == (22, 1)
    spans = SFTData(tmp_path / "cloze", tmp_path / "tokenizer.json", block_size=256, head="span")
    assert (len(spans.train), len(spans.val)) == (22, 1)


def test_gutenberg_cloze_takes_train_books_for_train_and_valid_books_for_eval(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_gutenberg(monkeypatch, tmp_path / "shared", {"train": [CLOZE_BOOK] * 3, "val": [CLOZE_BOOK]})
    code, out, err = cli("tasks", "prepare", "cloze", "--from", "gutenberg", "--examples", "20",
                         "--out", tmp_path / "cloze")  # fmt: skip
    assert code == 0, err
    assert "cloze: 17 train, 1 val, 1 eval examples" in out  # 18 train paragraphs, 19 wanted from train
    titles = {s: {r["title"] for r in lines(tmp_path / "cloze" / f"{s}.jsonl")} for s in ("train", "eval")}
    assert titles == {"train": {"1", "2", "3"}, "eval": {"4"}}  # book 4: the valid file's


def test_too_few_examples_for_three_files_is_an_error(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_gutenberg(monkeypatch, tmp_path / "shared", {"train": [CLOZE_BOOK], "val": [CLOZE_BOOK]})
    code, _, err = cli("tasks", "prepare", "cloze", "--from", "gutenberg", "--examples", "1",
                       "--out", tmp_path / "cloze")  # fmt: skip
    assert code == 1 and "too few cloze questions for train, val and eval" in err and "--examples" in err
    assert not (tmp_path / "cloze").exists()


def test_paragraphs_are_the_same_wherever_the_chunks_are_cut() -> None:
    text = "One line\nand its next.\n\n\nA second  paragraph.\n \nThird.\n"
    whole = list(paragraphs([text]))
    assert whole == ["One line and its next.", "A second paragraph.", "Third."]
    for cut in range(len(text)):
        assert list(paragraphs([text[:cut], text[cut:]])) == whole


def test_a_paragraph_without_a_repeated_span_makes_no_question() -> None:
    assert cloze_example("The cat sat on the mat. A dog barked loudly outside.", random.Random(0)) is None


@pytest.mark.parametrize("args", [["--examples", "5"], ["--from", "x.txt"]])
def test_corpus_options_are_refused_for_dataset_tasks(cli, tmp_path: Path, args: list[str]) -> None:
    code, _, err = cli("tasks", "prepare", "squad", *args, "--out", tmp_path / "out")
    assert code == 1 and "tasks made from a corpus" in err


def test_a_span_twice_in_the_question_sentence_is_never_blanked() -> None:
    # "silver lantern" is the only span held by another sentence; the first sentence holds it twice,
    # so blanking one copy would leave the answer in the question: only the second sentence may ask.
    paragraph = (
        "The silver lantern hung by the door, and the silver lantern swung in the cold wind. "
        "Margaret carried the silver lantern down to the harbour before the morning tide came in."
    )
    for seed in range(20):
        example = cloze_example(paragraph, random.Random(seed))
        assert example is not None
        question, _ = question_and_context(example["prompt"])
        assert example["answers"] == ["silver lantern"] and "silver lantern" not in question
        assert question.startswith("Margaret carried the")
