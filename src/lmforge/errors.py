"""Exceptions shared across layers: the CLI turns each into a one-line message and an exit status."""

from __future__ import annotations

import signal
from pathlib import Path

# Characters that end a line (str.splitlines' list), shown escaped in messages.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class LmforgeError(Exception):
    """A problem with the user's input or files, reported as one line without a traceback."""

    def __str__(self) -> str:
        # Messages quote user input (a --set value, a file name, a JSON key) that may hold line breaks;
        # escaped, the message stays the one line the CLI promises.
        return super().__str__().translate(_LINE_BREAKS)


class TrainingInterrupted(Exception):
    """Raised after a SIGINT/SIGTERM once the checkpoint is safely written; says how to go on."""

    def __init__(self, signum: int, step: int, checkpoint: Path, *, run_dir: Path) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}; "
            f"continue with `lmforge train --resume --out {run_dir}`"
        )
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
