"""Words as the extractive tasks see them: which context words a question holds."""

from __future__ import annotations

from lmforge.words import question_matches

PROMPT = (
    "Question: Where did the Broncos play in 2016?\n"
    "Context: The broncos played in Denver in 2016. The game was long.\n"
    "Question: Where did the Broncos play in 2016?\nAnswer:"
)


def matched_words(prompt: str) -> list[str]:
    """The runs of marked characters, with one token per character."""
    marks = question_matches(prompt, [(i, i + 1) for i in range(len(prompt))])
    return "".join(char if marked else " " for char, marked in zip(prompt, marks)).split()


def test_context_words_the_question_holds_are_marked_whole_words_case_folded() -> None:
    # "played" is not "play", "the" and "in" are function words, the question lines are not context
    assert matched_words(PROMPT) == ["broncos", "2016"]


def test_the_last_question_line_is_the_question_and_a_prompt_without_one_matches_nothing() -> None:
    assert matched_words("Question: cats?\nContext: cats and dogs\nQuestion: dogs?\nAnswer:") == ["dogs"]
    assert matched_words("Context: cats and dogs\nAnswer: cats") == []


def test_words_of_any_script_are_matched_whole() -> None:
    # an ASCII-only word pattern would match "Wis" (a different word) and miss "Łazienki"
    prompt = "Context: The Wisła passes Łazienki, not Wis.\nQuestion: Where does the WISŁA pass łazienki?"
    assert matched_words(prompt) == ["Wisła", "Łazienki"]


def test_a_token_is_marked_when_any_of_its_characters_is() -> None:
    prompt = "Context: Broncos.\nQuestion: Broncos?"
    offsets = [(0, 9), (9, 11), (11, 18), (18, 37)]  # "Context: ", "Br", "oncos.\n", the question line
    assert question_matches(prompt, offsets) == [False, True, True, False]
