"""Where lmforge's messages go: one `lmforge` logger, with one handler of its own.

Library modules log through `logging.getLogger(__name__)` (`lmforge.data.prepare`, ...), children of
`lmforge`. The handler writes a record as one line: `warning: ...` for a warning, `error: ...` for an
error, `debug: ...` for debug, and an info message as it is. Lines go to stderr, but for the records
logged with `extra=ON_STDOUT` (a training run's messages, which were always on stdout). `lmforge`
commands set the level once (`command_output`); elsewhere it is the root logger's, WARNING unless
the application configures logging.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

LOGGER_NAME = "lmforge"
ON_STDOUT = {"lmforge_stdout": True}  # logger.info(text, extra=ON_STDOUT): a line for stdout
PREFIXES = {logging.DEBUG: "debug: ", logging.INFO: "", logging.WARNING: "warning: "}


class PrefixFormatter(logging.Formatter):
    """The message after a lowercase prefix that says what it is (none for info)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "error: " if record.levelno >= logging.ERROR else PREFIXES.get(record.levelno, "")
        return prefix + super().format(record)


class TerminalHandler(logging.Handler):
    """Writes each record to sys.stderr (or sys.stdout) as it is when the record is emitted, not
    when the handler was made: a redirection made later (pytest's capsys, contextlib.redirect_stderr)
    gets the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stdout if getattr(record, "lmforge_stdout", False) else sys.stderr
            bars = sys.modules.get("tqdm")  # not imported: no progress bar can be on the screen
            if bars is None:
                stream.write(text + "\n")
            else:  # clears a bar drawn on the terminal and draws it again below the line
                bars.tqdm.write(text, file=stream)
            stream.flush()
        except Exception:
            self.handleError(record)


def _install() -> logging.Logger:
    """The `lmforge` logger with its handler (once, even if this module is loaded again)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, TerminalHandler) for handler in logger.handlers):
        handler = TerminalHandler()
        handler.setFormatter(PrefixFormatter())
        logger.addHandler(handler)
    # Why a handler here and not the NullHandler of the logging HOWTO: a NullHandler counts as a
    # handler, so logging's lastResort (WARNING and above to stderr when nothing is configured) never
    # runs, and a library user would not see that bf16 is emulated or that a run folder cannot be
    # locked. lastResort alone prints the bare message, and only while no handler at all is
    # configured. So lmforge prints its own records, once: warnings and errors by default (the level
    # is left unset and follows the root logger, WARNING), info too once the application asks
    # (`logging.basicConfig(level=logging.INFO)` or `logging.getLogger("lmforge").setLevel(...)`).
    # propagate is off so that an application's root handler does not print each line a second
    # time; to take lmforge's records into its own handlers instead, remove this one and turn
    # propagate back on (README, "Output").
    logger.propagate = False
    return logger


LOGGER = _install()


@contextlib.contextmanager
def command_output(level: int) -> Iterator[None]:
    """The `lmforge` logger at `level` for one command, the level it had afterwards (`main` may run
    several times in one process: the tests, a program that calls it)."""
    previous = LOGGER.level
    LOGGER.setLevel(level)
    try:
        yield
    finally:
        LOGGER.setLevel(previous)
