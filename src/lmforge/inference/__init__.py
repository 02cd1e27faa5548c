"""A checkpoint put to use: `load` checks it and gives the one `InferenceSession` (model, tokenizer,
chat template, device, precision) that every front end works from; generation (`generate`), its text
rules (`sampling`), `lmforge sample` (`sample`), and the loss over a split (`loss`). Training and the
front ends (`chat`, `serve`, `eval`, `export`) build on it; it imports nothing from them."""

from lmforge.inference.session import InferenceSession, ModelSource, load

__all__ = ["InferenceSession", "ModelSource", "load"]
