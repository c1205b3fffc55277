"""Progress events: how far a long piece of work (a download, a training) is, as log records.

The protocol is one logger, PROGRESS_LOGGER. A record on it whose `progress` attribute is a
dict is an event; any other record on it is a plain progress line ("corpus: Cached in 0.1 s").

    record.progress = {
        "task": "download-glove.6B.zip",  # one bar per task name
        "done": 431_000_000, "total": 862_182_613,  # total None: unknown
        "unit": "B",                       # "B" (shown as MB and MB/s) or a plural noun: "batches"
        "phase": "epoch 3/20",             # a new phase restarts the bar (and its rate)
        "fields": {"loss": 0.5312},        # shown after the counts
        "line": False,                     # True every `every` seconds: also worth a line of text
        "final": False,                    # True once: the work is over, the bar goes
    }

The CLI (flows/console.py) draws the events as bars on a terminal, and prints the records
with line=True as text otherwise. Inside a Prefect run, Reporter also sends those lines to the
run log and keeps a progress artifact (percent done) up to date, so the UI shows the same.
Only the standard library is imported here (Prefect lazily, inside a run): storage and the
model package report through plain logging records or a callable.
"""

from __future__ import annotations

import logging
import time
from typing import Any

PROGRESS_LOGGER = "newsgroups_lstm.progress"
_progress_log = logging.getLogger(PROGRESS_LOGGER)


def describe(event: dict[str, Any]) -> str:
    """The event as one line: `download-x.zip: 412.3 of 862.2 MB (48%), 35.2 MB/s, 13 s left`."""
    done, total, unit = event["done"], event.get("total"), event.get("unit", "")
    head = f"{event['task']} {event['phase']}" if event.get("phase") else event["task"]
    if unit == "B":
        counts = f"{done / 1e6:,.1f} of {total / 1e6:,.1f} MB" if total else f"{done / 1e6:,.1f} MB"
    else:
        counts = f"{done} of {total} {unit}" if total else f"{done} {unit}"
    parts = [counts + (f" ({100 * done / total:.0f}%)" if total else "")]
    rate, left = event.get("rate"), event.get("seconds_left")
    if rate and unit == "B":
        parts.append(f"{rate / 1e6:,.1f} MB/s")
    parts += [f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
              for name, value in (event.get("fields") or {}).items()]
    if left is not None:
        parts.append(f"{left:.0f} s left")
    return f"{head}: " + ", ".join(parts)


class Reporter:
    """Sends the progress of one task as events; a line (and a progress artifact update) every `every` seconds.

    `update()` may be called as often as a batch or a chunk arrives: an event is one logging record.
    """

    def __init__(self, task: str, unit: str, every: float = 10.0):
        self.task, self.unit, self.every = task, unit, every
        self.phase: str | None = None
        self.started = self.last_line = time.monotonic()
        self.run_log, self.artifact, self.last_event = _run_logger(), None, None
        if self.run_log is not None:
            self.artifact = _progress_artifact(None, 0.0, f"{task}: started")

    def update(self, done: int, total: int | None = None, phase: str | None = None, overall: float | None = None,
               **fields: Any) -> None:
        """`done` of `total` units of the current `phase`; `overall` (0..1) the share of the whole task, for the UI."""
        now = time.monotonic()
        if phase != self.phase:
            self.phase, self.started = phase, now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 and done else None
        line = now - self.last_line >= self.every
        self.last_event = {"task": self.task, "done": done, "total": total, "unit": self.unit, "phase": phase,
                           "fields": fields, "line": line, "final": False, "rate": rate,
                           "seconds_left": (total - done) / rate if rate and total else None}
        if not line:
            _progress_log.info(self.task, extra={"progress": self.last_event})
            return
        self.last_line = now
        text = describe(self.last_event)
        _progress_log.info(text, extra={"progress": self.last_event})
        if self.run_log is not None:
            self.run_log.info(text)
            share = overall if overall is not None else (done / total if total else 0.0)
            self.artifact = _progress_artifact(self.artifact, 100.0 * min(1.0, share), text)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(completed=kind is None)

    def close(self, completed: bool = True) -> None:
        """The work is over: the bar goes; a completed task's progress artifact shows 100%."""
        event = self.last_event or {"task": self.task, "done": 0, "total": None, "unit": self.unit, "phase": None}
        _progress_log.info(self.task, extra={"progress": {**event, "line": False, "final": True}})
        if self.artifact is not None and completed:
            _progress_artifact(self.artifact, 100.0, f"{self.task}: done")


def _run_logger():
    """Prefect's run logger when called inside a flow or task run, else None."""
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        from prefect.logging import get_run_logger

        return get_run_logger()
    return None


def _progress_artifact(artifact_id, percent: float, description: str):
    """Create (artifact_id None) or update the run's progress artifact; its id. A failing API only loses the artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    try:
        if artifact_id is None:
            return create_progress_artifact(percent, description=description)
        update_progress_artifact(artifact_id, percent, description=description)
    except Exception as exc:  # noqa: BLE001 - progress is informational: never fail the work for it
        logging.getLogger(__name__).debug("progress artifact: %s", exc)
    return artifact_id
