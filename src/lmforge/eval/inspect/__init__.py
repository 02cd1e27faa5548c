"""`lmforge inspect`: look inside a model on one prompt.

For a checkpoint (trained, fine-tuned or imported from Hugging Face) and a text, write to one
folder: the attention maps of every layer and head, the logit lens (what each layer's residual
stream predicts through the final norm and head), the surprisal of every token as an HTML page,
and the top-k next tokens at each position. The numbers come from the model's own forward pass
(`trace`); the files only show them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.inspect.report import (
    Decode,
    lens_layer_names,
    lens_table,
    lens_tsv,
    surprisal_html,
    token_label,
    top_k_json,
)
from lmforge.eval.inspect.trace import Trace, attention_probabilities, logit_lens, recording, trace
from lmforge.inference import InferenceSession, ModelSource
from lmforge.staging import check_out, staged_folder

__all__ = [
    "InspectReport",
    "Trace",
    "attention_probabilities",
    "inspect_checkpoint",
    "logit_lens",
    "recording",
    "trace",
]

SUMMARY = "summary.json"


@dataclass(frozen=True)
class InspectReport:
    """Where the files went, the summary written beside them, and the lens table to print."""

    out: Path
    summary: dict
    table: str

    def describe(self) -> str:
        s = self.summary
        return (
            f"{self.table}\n\n"
            f"{s['checkpoint']} (step {s['step']}): {s['tokens']} tokens, mean loss {s['mean_loss']:.4f} "
            f"nats/token ({s['mean_surprisal_bits']:.3f} bits); {len(s['files'])} files -> {self.out}"
        )


def prompt_tokens(session: InferenceSession, prompt: str) -> list[int]:
    """The tokens of a non-empty prompt: at least two (one to predict from, one to predict), at
    most block_size."""
    ids = session.prompt_ids(prompt)
    block_size = session.config.model.block_size
    if len(ids) < 2:
        raise LmforgeError(
            f"--prompt is {len(ids)} token; inspect needs at least 2 (one to predict the next)"
        )
    if len(ids) > block_size:
        raise LmforgeError(
            f"--prompt is {len(ids)} tokens, longer than this model's block_size {block_size}; shorten it"
        )
    return ids


def inspect_checkpoint(
    source: ModelSource, *, prompt: str, out: Path, top_k: int, overwrite: bool
) -> InspectReport:
    """Load the checkpoint of `source`, run `prompt` through it once and write the inspection files
    into the new folder `out` (replaced only with `overwrite`)."""
    if not prompt:  # before anything is loaded
        raise LmforgeError("--prompt is empty: give the text to inspect")
    check_out(out, "inspect", overwrite, inputs=(source.target,))
    session = source.load()
    ids = prompt_tokens(session, prompt)
    result = trace(session.model, ids, top_k, autocast=session.autocast())

    def decode(token: int) -> str:
        return session.tokenizer.decode([token], skip_special_tokens=False)

    summary = {
        "checkpoint": str(session.checkpoint),
        "step": session.step,
        "prompt": prompt,
        "tokens": len(ids),
        "layers": len(result.attention),
        "heads": result.attention[0].size(0),
        "mean_loss": float(result.surprisal.mean()),
        "mean_surprisal_bits": float(result.surprisal.mean()) / math.log(2),
        "attention_max_error": result.attention_error,
        "top_k": result.top_k()[1].size(-1),  # what topk.json lists: --top-k, or the whole vocabulary
    }
    with staged_folder(out, "inspect", overwrite, inputs=(source.target,)) as folder:
        summary["files"] = write_files(folder, result, decode, title=f"surprisal: {session.checkpoint}")
        (folder / SUMMARY).write_text(
            json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return InspectReport(out, summary, lens_table(result, decode))


def write_files(folder: Path, result: Trace, decode: Decode, *, title: str) -> list[str]:
    """Every output file of one inspection into `folder`; returns their names (the summary's too)."""
    from lmforge.eval.inspect import plots  # matplotlib: only when pictures are drawn

    labels = [token_label(decode(token)) for token in result.ids]
    names = []
    for layer, probs in enumerate(result.attention):
        names.append(f"attention_layer{layer}.png")
        plots.attention_grid(probs, labels, layer, path=folder / names[-1])
    top1 = [[token_label(decode(int(i))) for i in row[:-1]] for row in result.lens.ids[..., 0]]
    vocab = result.logits.size(-1)
    plots.lens_heatmap(
        result.lens.ranks,
        top1,
        lens_layer_names(result),
        labels=labels,
        vocab=vocab,
        path=folder / "logit_lens.png",
    )
    (folder / "logit_lens.tsv").write_text(lens_tsv(result, decode), encoding="utf-8")
    (folder / "surprisal.html").write_text(surprisal_html(result, decode, title), encoding="utf-8")
    # A position per line: readable, and still one JSON document.
    positions = (json.dumps(position, ensure_ascii=False) for position in top_k_json(result, decode))
    (folder / "topk.json").write_text("[\n" + ",\n".join(positions) + "\n]\n", encoding="utf-8")
    return [*names, "logit_lens.png", "logit_lens.tsv", "surprisal.html", "topk.json", SUMMARY]
