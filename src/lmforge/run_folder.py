"""Where a run folder keeps its checkpoints: `checkpoints/step-NNNNNNN`, each with a `meta.json`.

The layout that `lmforge.checkpoint` writes and `lmforge.report` reads (`lmforge runs` tells a
finished run by its newest checkpoint), kept below both so that neither imports the other. It needs
nothing but the standard library: listing the checkpoints of a run imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    val_loss: float | None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """The checkpoints of a run, oldest first: its step folders with a readable meta.json.

    Anything else is not a checkpoint and is ignored (never chosen, never pruned): staging folders,
    and a folder whose meta.json is missing or garbage. `verify_checkpoint` checks the files.
    """
    found = []
    root = run_dir / CHECKPOINTS
    for path in sorted(root.glob(f"{PREFIX}*")) if root.is_dir() else []:
        try:
            meta = json.loads((path / "meta.json").read_text())
            val_loss = None if meta.get("val_loss") is None else float(meta["val_loss"])
            found.append(CheckpointInfo(path, int(meta["step"]), val_loss))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(found, key=lambda c: c.step)
