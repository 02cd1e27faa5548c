"""Exceptions shared across layers: the CLI turns each into a one-line message and an exit status."""

from __future__ import annotations

import signal
from pathlib import Path


class LmforgeError(Exception):
    """A problem with the user's input or files, reported as one line without a traceback."""


class TrainingInterrupted(Exception):
    """Raised after a SIGINT/SIGTERM once the checkpoint is safely written; says how to go on."""

    def __init__(self, signum: int, step: int, checkpoint: Path, run_dir: Path) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}; "
            f"continue with `lmforge train --resume --out {run_dir}`"
        )
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
