"""What a batch's targets hold: the values that data (which builds them) and model (which scores
them) agree on. Defined here, below both, so that neither imports the other."""

from __future__ import annotations

IGNORE_INDEX = -100  # a target that does not count in the loss (masked prompt, padding)
# Targets of a span head, per position: bit flags on a prompt token, IGNORE_INDEX on padding. SPAN_MATCH
# is an input, not a target: a context word that the question holds (model.word_match).
SPAN_OTHER, SPAN_START, SPAN_END, SPAN_MATCH = 0, 1, 2, 4
