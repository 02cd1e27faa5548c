"""Words of English text as the extractive tasks see them: function words, whole-word search, and
which words of a context also occur in its question (a span model's word-match input)."""

from __future__ import annotations

import re

# Function words: too common to tell a passage apart, so they never count as a match.
STOPWORDS = frozenset(
    """a about after again all also am an and any are as at be been before being but by can could
    did do does doing down each for from had has have having he her here hers him his how i if in into
    is it its just me more most my no nor not now of off on once only or other our out over own said
    same she should so some such than that the their them then there these they this those through to
    too under until up upon very was we were what when where which while who whom why will with would
    you your shall may might must one two""".split()
)
QUESTION_LINE = re.compile(r"^Question:(.*)$", re.MULTILINE)  # as tasks.squad.squad_prompt writes it
# Letters and digits of any script: an ASCII class would split "Wisła" into "Wis" and "a"
MATCHED_WORD = re.compile(r"[^\W_]+")


def whole_words(text: str) -> re.Pattern[str]:
    """`text` as a pattern that matches only whole words (not inside a longer word)."""
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)")


def question_matches(prompt: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character `offsets` in `prompt`): whether it is part of a word outside the
    question lines that the question also holds (case-folded, function words aside). The question is
    the prompt's last line that starts with "Question:"; a prompt without one matches nothing.

    This is DrQA's exact-match feature (Chen et al. 2017): a small reader finds the sentence that
    answers a question mostly by the question's words in it, which it cannot learn to look up
    in a few thousand examples."""
    questions = list(QUESTION_LINE.finditer(prompt))
    if not questions:
        return [False] * len(offsets)
    asked = {w.casefold() for w in MATCHED_WORD.findall(questions[-1].group(1))} - STOPWORDS
    in_question, marked = bytearray(len(prompt)), bytearray(len(prompt))
    for line in questions:
        in_question[line.start() : line.end()] = b"\1" * (line.end() - line.start())
    for word in MATCHED_WORD.finditer(prompt):
        if not in_question[word.start()] and word.group().casefold() in asked:
            marked[word.start() : word.end()] = b"\1" * (word.end() - word.start())
    return [any(marked[start:end]) for start, end in offsets]
