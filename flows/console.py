"""What the CLI shows on stderr while a command runs: the progress logger's records (tasks.progress).

- stderr is a terminal: one bar per progress task (a download: MB, MB/s and time left; training:
  the epoch's batches and the loss), and every other record printed as a line above the bars;
- stderr is a file or a pipe: one line per record ("12:03:07  corpus: Cached in 0.1 s"), and of the
  progress events only those marked as a line (every few seconds per task).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from tasks.progress import PROGRESS_LOGGER

LINE_FORMAT = logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S")


class PlainLines(logging.Handler):
    """A line per record, to whatever sys.stderr is at the time (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "progress", None)
        if event is not None and not event.get("line"):
            return
        try:
            sys.stderr.write(LINE_FORMAT.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


class Counts(ProgressColumn):
    """`412.3/862.2 MB  35.2 MB/s` for bytes, `80/177 batch  loss 0.5312` otherwise."""

    def render(self, task) -> Text:
        unit, total = task.fields.get("unit") or "", task.total
        if unit == "B":
            parts = [f"{task.completed / 1e6:,.1f}/{total / 1e6:,.1f} MB" if total else f"{task.completed / 1e6:,.1f} MB"]
            parts += [f"{task.speed / 1e6:,.1f} MB/s"] if task.speed else []
        else:
            parts = [f"{task.completed:.0f}/{total:.0f} {unit}" if total else f"{task.completed:.0f} {unit}"]
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in task.fields.get("values", {}).items()]
        return Text("  ".join(parts))


class Bars(logging.Handler):
    """Rich progress bars on the terminal; other records as lines above them. The display starts with the first bar."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self._own_file = None if console else _stderr_copy()
        self._console = console or (Console(file=self._own_file) if self._own_file else Console(stderr=True))
        self._progress: Progress | None = None
        self._rows: dict[str, tuple] = {}  # task name -> (rich task id, description)
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "progress", None)
            with self._lock:
                if event is None:
                    self._print(LINE_FORMAT.format(record))
                elif event.get("final"):
                    self._remove(event["task"])
                else:
                    self._update(event)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)

    def _print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def _update(self, event: dict) -> None:
        progress = self._start()
        task, phase, total = event["task"], event.get("phase"), event.get("total")
        description = f"{task} {phase}" if phase else task
        row, shown = self._rows.get(task, (None, None))
        if row is None:
            row = progress.add_task(description, total=total, unit=event.get("unit"))
        elif shown != description:  # a new epoch: the bar, its rate and its ETA start again
            progress.reset(row, total=total, description=description)
        self._rows[task] = (row, description)
        progress.update(row, completed=event["done"], total=total, values=event.get("fields") or {})

    def _remove(self, task: str) -> None:
        row, _ = self._rows.pop(task, (None, None))
        if row is not None and self._progress is not None:
            self._progress.remove_task(row)

    def _start(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), Counts(), TimeRemainingColumn(),
                console=self._console, transient=True, redirect_stdout=False, redirect_stderr=True, refresh_per_second=4,
            )
            self._progress.start()
        return self._progress

    def stop(self) -> None:
        """Take the bars down and release the terminal (not close(): logging.config.dictConfig, which Prefect
        runs when it is imported, closes every existing handler, and this one must keep working)."""
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
                self._rows.clear()
            if self._own_file is not None:
                self._own_file.close()
                self._own_file = None


def _stderr_copy():
    """The terminal as its own file descriptor: the bars keep drawing while fd 2 is captured
    (tasks/model/native_log.py, during TensorFlow's import)."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8")
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (replaced by a test)
        return None


@contextmanager
def progress_output(terminal: bool | None = None):
    """Show the progress logger's records on stderr while the block runs: bars on a terminal, else lines."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    handler = Bars() if (sys.stderr.isatty() if terminal is None else terminal) else PlainLines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        if isinstance(handler, Bars):
            handler.stop()
        logger.propagate = propagate
