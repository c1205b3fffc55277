"""Download progress: a bar on a terminal's stderr, a log line every ~10% for big files, and a callback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

log = logging.getLogger("newsgroups_lstm.progress")  # = tasks.step.PROGRESS_LOGGER: the CLI prints it

PROGRESS_LOG_MIN_BYTES = 16 * 1024**2  # below this, no 10% log lines
Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


class Meter:
    def __init__(self, url: str, total: int | None, callback: Progress | None, start: int = 0):
        self.url, self.total, self.callback, self.done_bytes = url, total, callback, start
        self.tty = callback is None and sys.stderr.isatty()  # a caller that takes the progress shows it itself
        self.log_lines = total is not None and total >= PROGRESS_LOG_MIN_BYTES
        self.next_decile = (start * 10 // total + 1) if total else 1
        self.name = url.rstrip("/").rsplit("/", 1)[-1]

    def advance(self, n: int) -> None:
        self.done_bytes += n
        if self.callback:
            self.callback(self.done_bytes, self.total)
        if self.total:
            if self.log_lines and self.done_bytes * 10 >= self.next_decile * self.total:
                self.next_decile = self.done_bytes * 10 // self.total + 1
                log.info("%s: %d%% (%s of %s bytes)", self.name, min(100, self.done_bytes * 100 // self.total),
                         f"{self.done_bytes:,}", f"{self.total:,}")
            if self.tty:
                frac = min(1.0, self.done_bytes / self.total)
                sys.stderr.write(f"\r{self.name} [{'#' * int(frac * 30):<30}] {frac:6.1%}")
                sys.stderr.flush()
        elif self.tty:
            sys.stderr.write(f"\r{self.name} {self.done_bytes / 1e6:,.1f} MB")
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
