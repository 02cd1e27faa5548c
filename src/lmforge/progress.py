"""Progress bars that draw only on a terminal.

Anywhere else (a log file, a pipe, CI) a bar's carriage-return updates pile up into one huge line;
there the progress is one plain info line through the logger at most every LINE_INTERVAL_S
seconds, and none for work shorter than that. Either shows only when the `lmforge` logger lets
info through: not under `lmforge -q`, nor in library use until logging is configured.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 10.0  # seconds between two progress lines off the terminal

logger = logging.getLogger(__name__)


class ProgressLines:
    """The part of tqdm's interface lmforge uses (update, set_postfix, close, iteration, `with`),
    reported as a line such as `encode: 12.3MB/45.6MB (27%), 1.20MB/s, 00:10 elapsed`; none for
    work done within `interval_s`, and none at the end (the caller's own message says it is done)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None,
        desc: str,
        unit: str,
        initial: float = 0,
        unit_scale: bool = False,
        enabled: bool = True,
        interval_s: float = LINE_INTERVAL_S,
    ) -> None:
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.n = self.first = initial
        self.enabled, self.interval_s = enabled, interval_s
        self.postfix = ""
        self.start = self.last_line = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last_line >= self.interval_s:
            self.last_line = now
            logger.info(self.line(now - self.start))

    def line(self, elapsed: float) -> str:
        """Where the work stands after `elapsed` seconds."""
        rate = (self.n - self.first) / max(elapsed, 1e-9)
        if self.unit_scale:  # 12.3MB/45.6MB, 1.20MB/s
            done = tqdm.format_sizeof(self.n, self.unit)
            done += f"/{tqdm.format_sizeof(self.total, self.unit)}" if self.total else ""
            speed = tqdm.format_sizeof(rate, self.unit)
        else:  # 120/5,000 step, 3.1 step/s
            done = f"{self.n:,.0f}" + (f"/{self.total:,.0f}" if self.total else "") + f" {self.unit}"
            speed = f"{rate:.3g} {self.unit}"
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        took = tqdm.format_interval(elapsed)
        return f"{self.desc}: {done}{share}, {speed}/s, {took} elapsed{self.postfix}"

    def set_postfix(self, values: dict[str, Any]) -> None:
        """Figures appended to the next lines (a training run's loss and throughput)."""
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def close(self) -> None:
        """Nothing to clear or finish."""

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ProgressBar = tqdm | ProgressLines


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str,
    enabled: bool = True,
    initial: float = 0,
    unit_scale: bool = False,
    leave: bool = True,
    stream: TextIO | None = None,
) -> ProgressBar:
    """A tqdm bar on `stream` (default sys.stderr) when it is a terminal, else `ProgressLines`;
    silent unless `enabled` and the logger lets info through. Wraps `iterable` when given."""
    stream = sys.stderr if stream is None else stream
    shown = enabled and logger.isEnabledFor(logging.INFO)
    if shown and _is_terminal(stream):
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            unit_scale=unit_scale,
            leave=leave,
            file=stream,
            dynamic_ncols=True,
        )
    options = dict(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale)
    return ProgressLines(iterable, enabled=shown, **options)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())
