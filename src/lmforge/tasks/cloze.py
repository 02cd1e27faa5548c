"""Span-selection pretraining data (Glass et al. 2020, "Span Selection Pre-training for Question
Answering"): SQuAD-format questions made from any text corpus, answered like SQuAD.

Each example comes from one paragraph. One of its sentences becomes the question, with a span
replaced by `[BLANK]`; the context is the paragraph *without that sentence*, and the span is chosen
among those that occur again (as whole words, same case) in another sentence of it. So the answer is
always in the context but never at the place the question was cut from: the model has to find where
else the paragraph names the blanked thing, which is what extractive QA asks of it. (Glass et al.
retrieve the answer passage from the rest of the corpus; the paragraph itself is the cheap, streaming
stand-in.)

The paragraphs are drawn by a seeded uniform sample (random keys, the top N kept), so the corpus
is read once, in chunks, and memory holds at most N examples whatever its size.
"""

from __future__ import annotations

import heapq
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tasks.squad import Squad, answer_in_prompt, squad_prompt
from lmforge.words import STOPWORDS, whole_words

BLANK = "[BLANK]"
DEFAULT_EXAMPLES = 20_000  # `tasks prepare cloze --examples`, over train, val and eval together
EVAL_SHARE = 0.05  # of the examples, held out as eval.jsonl
MAX_PARAGRAPH_CHARS = 1500  # longer paragraphs are skipped: prompt and answer stay within ~512 tokens
MAX_SPAN_WORDS = 3
MIN_QUESTION_WORDS = 4
WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*[A-Za-z]|[A-Za-z]")
# A sentence ends at . ! ? (and closing quotes or brackets) before whitespace, except after common titles.
SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\bMme)[.!?]+[\"'”’)\]]*(?=\s)")
BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")
MAX_PENDING_CHARS = 1 << 16  # text without a blank line kept while looking for a paragraph's end


def sentences(paragraph: str) -> list[str]:
    """The sentences of a whitespace-normalised paragraph."""
    found, start = [], 0
    for end in SENTENCE_END.finditer(paragraph):
        found.append(paragraph[start : end.end()].strip())
        start = end.end()
    found.append(paragraph[start:].strip())
    return [s for s in found if s]


Span = tuple[str, ...]  # the words of a span


def word_spans(sentence: str) -> dict[Span, tuple[int, int]]:
    """Each run of 1 to MAX_SPAN_WORDS adjacent words (separated by one space) of `sentence`, with the
    character range of its first occurrence."""
    words = list(WORD.finditer(sentence))
    spans: dict[Span, tuple[int, int]] = {}
    for i in range(len(words)):
        for j in range(i, min(i + MAX_SPAN_WORDS, len(words))):
            if j > i and sentence[words[j - 1].end() : words[j].start()] != " ":
                break
            spans.setdefault(tuple(w.group() for w in words[i : j + 1]), (words[i].start(), words[j].end()))
    return spans


def _answerable(span: Span) -> bool:
    """Not starting or ending with a function word, and holding a content word of 4+ letters."""
    if span[0].lower() in STOPWORDS or span[-1].lower() in STOPWORDS:
        return False
    return any(len(w) >= 4 and w.lower() not in STOPWORDS for w in span)


def _inside(short: Span, long: Span) -> bool:
    return len(short) < len(long) and any(
        long[i : i + len(short)] == short for i in range(len(long) - len(short) + 1)
    )


def candidate_spans(spans: dict[Span, tuple[int, int]], elsewhere: Counter) -> list[Span]:
    """The answerable spans of a sentence that another sentence of the paragraph also holds (as whole
    words, same case; `elsewhere` counts the sentences holding each span, this one included); only the
    longest (a span inside another candidate is dropped)."""
    found = [span for span in spans if elsewhere[span] >= 2 and _answerable(span)]
    return sorted(span for span in found if not any(_inside(span, other) for other in found))


def _once(span: Span, sentence: str) -> bool:
    """Whether `span` occurs once in `sentence` (as whole words): blanking it then hides it."""
    return len(whole_words(" ".join(span)).findall(sentence)) == 1


def cloze_example(paragraph: str, rng: random.Random) -> dict | None:
    """One question from a paragraph (a sentence with a span blanked; context: the other sentences),
    or None when no sentence has a span that occurs elsewhere in the paragraph."""
    parts = sentences(paragraph)
    spans = [word_spans(sentence) for sentence in parts]
    holding = Counter(span for found in spans for span in found)
    options = [
        (i, candidates)
        for i, sentence in enumerate(parts)
        if len(WORD.findall(sentence)) >= MIN_QUESTION_WORDS
        and (candidates := [c for c in candidate_spans(spans[i], holding) if _once(c, sentence)])
    ]
    if not options:
        return None
    i, candidates = rng.choice(options)
    start, end = spans[i][rng.choice(candidates)]
    question = parts[i][:start] + BLANK + parts[i][end:]
    answer, context = parts[i][start:end], " ".join(parts[:i] + parts[i + 1 :])
    prompt = squad_prompt(context, question)
    # the span occurs in another sentence: its first whole-word occurrence in the context
    found = whole_words(answer).search(context)
    at = {"answer_start": answer_in_prompt(prompt, context, found.start())} if found else {}
    return {"prompt": prompt, "completion": " " + answer, **at, "answers": [answer]}


def paragraphs(chunks: Iterable[str]) -> Iterator[str]:
    """The paragraphs (separated by blank lines) of a stream of text, whitespace-normalised; text
    that runs past MAX_PENDING_CHARS without a blank line is dropped up to the next one."""
    pending, overlong = "", False
    for chunk in chunks:
        pending += chunk
        *complete, pending = BLANK_LINES.split(pending)
        for text in complete:
            if not overlong:
                yield " ".join(text.split())
            overlong = False
        if len(pending) > MAX_PENDING_CHARS:
            pending, overlong = "", True
    if pending.strip() and not overlong:
        yield " ".join(pending.split())


@dataclass
class _Sample:
    """A seeded uniform sample of up to `size` examples: every paragraph gets a random key, the examples
    of the `size` highest keys are kept, and a paragraph is turned into an example only when its key
    would enter, so most of a large corpus is never analysed."""

    size: int
    seed: int
    kept: list[tuple[float, int, dict]]

    def offer(self, key: float, number: int, paragraph: str, *, example_id: str) -> None:
        if len(self.kept) == self.size and (self.size == 0 or key <= self.kept[0][0]):
            return
        if not 0 < len(paragraph) <= MAX_PARAGRAPH_CHARS:
            return
        example = cloze_example(paragraph, random.Random(self.seed * 2**40 + number))
        if example is None:
            return
        example = {**example, "id": example_id, "title": example_id.split(".")[0]}
        if len(self.kept) < self.size:
            heapq.heappush(self.kept, (key, number, example))
        else:
            heapq.heapreplace(self.kept, (key, number, example))

    def examples(self) -> list[dict]:
        """The kept examples in corpus order."""
        return [example for _, _, example in sorted(self.kept, key=lambda kept: kept[1])]


def draw_examples(corpus: str, examples: int, seed: int) -> tuple[list[dict], list[dict] | None]:
    """(examples of the corpus's train part, examples of its val part or None when it has none), at
    most `examples` in all: a val part gets EVAL_SHARE of them."""
    from lmforge.data.sources import open_corpus  # lmforge.data imports torch: not at import time

    source = open_corpus(corpus)
    held = max(1, round(examples * EVAL_SHARE)) if source.given_split else 0
    samples = {"train": _Sample(examples - held, seed, []), "val": _Sample(held, seed + 1, [])}
    keys = random.Random(seed)
    number = 0
    for document_no, document in enumerate(source.documents(), start=1):
        sample = samples["val" if document.split == "val" else "train"]
        for paragraph_no, paragraph in enumerate(paragraphs(document), start=1):
            number += 1
            sample.offer(keys.random(), number, paragraph, example_id=f"{document_no}.{paragraph_no}")
    return samples["train"].examples(), samples["val"].examples() if source.given_split else None


class Cloze(Squad):
    name = "cloze"
    listing_order = 5
    from_corpus = True
    val_group = None  # examples come one per paragraph, chosen one by one

    def splits(self, root: Path | None) -> dict[str, Iterable[dict]]:
        raise LmforgeError("cloze questions are made from a corpus: give --from CORPUS")

    def corpus_splits(self, corpus: str, examples: int | None, seed: int) -> dict[str, Iterable[dict]]:
        """Train from the corpus (its train part when it comes split), eval from its val part, else a
        seeded EVAL_SHARE of the examples drawn; `prepare_task` carves val.jsonl from train."""
        from lmforge.tasks import carve_validation

        train, held = draw_examples(corpus, examples or DEFAULT_EXAMPLES, seed)
        if held is None:
            train, held = carve_validation(train, EVAL_SHARE, seed + 1)
        if not train or not held:
            raise LmforgeError(
                f"{corpus}: too few cloze questions for train, val and eval ({len(train)} + {len(held)} "
                f"drawn): raise --examples (default {DEFAULT_EXAMPLES:,}) or give a longer corpus"
            )
        return {"train": train, "eval": held}


TASK = Cloze()
