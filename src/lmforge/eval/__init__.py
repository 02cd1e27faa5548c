"""Evaluation: language-model loss, perplexity and bits per byte."""

from lmforge.eval.lm import LMEval, evaluate_lm

__all__ = ["LMEval", "evaluate_lm"]
