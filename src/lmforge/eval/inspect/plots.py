"""The pictures of `lmforge inspect`: one grid of attention maps per layer, and the logit lens as a
heat map of the next token's rank. matplotlib is imported here only, and only its `Figure`: no
pyplot, so no display is needed and the backend of a program that calls this is left alone."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

MAX_LABELLED = 64  # positions up to which each token is written on the axes (and in lens cells)


def _figure(**options):
    """A matplotlib Figure (drawn with Agg when saved)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LmforgeError("inspect draws its pictures with matplotlib: pip install matplotlib") from None
    return Figure(layout="constrained", **options)


def _label_axis(ax, axis: str, labels: list[str]) -> None:
    """Every token on the x or y axis when there are few, else a few positions."""
    ticks = range(len(labels)) if len(labels) <= MAX_LABELLED else range(0, len(labels), len(labels) // 8)
    names = [labels[t] if len(labels) <= MAX_LABELLED else str(t) for t in ticks]
    getattr(ax, f"set_{axis}ticks")(list(ticks))
    getattr(ax, f"set_{axis}ticklabels")(names, rotation=90 if axis == "x" else 0)


def attention_grid(probs: torch.Tensor, labels: list[str], layer: int, *, path: Path) -> None:
    """probs: (H, T, T) of one layer; a panel per head, queries down, keys across."""
    heads, T = probs.size(0), probs.size(-1)
    cols = math.ceil(math.sqrt(heads))  # a square-ish grid of panels
    rows = math.ceil(heads / cols)
    side = min(max(2.5, 0.13 * T + 1.2), 7.0)
    fig = _figure(figsize=(side * cols + 1, side * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    _label_axis(axes[0, 0], "x", labels)  # shared: every panel has the same ticks
    _label_axis(axes[0, 0], "y", labels)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.tick_params(labelsize=max(4.0, min(8.0, 280 / T)))
        ax.label_outer()  # tokens written once per row and column, not in every panel
    fig.suptitle(f"layer {layer}: attention probabilities (row: query, column: key)", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=90)


def lens_heatmap(
    ranks: torch.Tensor, top1: list[list[str]], rows: list[str], *, labels: list[str], vocab: int, path: Path
) -> None:
    """ranks: (L + 1, T - 1) rank of the prompt's next token per lens row and position (0: top);
    top1: each cell's likeliest token, written in the cell when there is room."""
    n_rows, T = ranks.shape
    size = (min(max(5.0, 0.33 * T + 2.5), 22.0), max(2.5, 0.4 * n_rows + 1.6))
    fig = _figure(figsize=size)
    from matplotlib.colors import LogNorm  # after _figure has checked that matplotlib is there

    ax = fig.subplots()
    image = ax.imshow(
        (ranks + 1).numpy(), cmap="magma_r", norm=LogNorm(vmin=1, vmax=max(vocab, 2)), aspect="auto"
    )
    if T <= MAX_LABELLED:
        for r in range(n_rows):
            for t in range(T):
                dark = ranks[r, t].item() + 1 > math.sqrt(vocab)
                ax.text(
                    t, r, top1[r][t], ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(rows, fontsize=8)
    _label_axis(ax, "x", labels[1:])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("next token (cells: each layer's top prediction)")
    ax.set_title("logit lens: rank of the next token per layer (1 = top)", fontsize=10)
    fig.colorbar(image, ax=ax, label="rank of the next token", pad=0.01)
    fig.savefig(path, dpi=90)
