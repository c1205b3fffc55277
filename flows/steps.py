"""Running one step task from a flow: cache validation against the store, plus a per-step report.

Each step task caches on its inputs (tasks.common.STEP_CACHE_POLICY), and a cache hit
returns the ArtifactRef recorded the first time. If that artifact has since been deleted
or damaged, the hit would hand out a dangling ref; so before calling a step the flow
computes the key the step will publish under and, when the store does not hold a complete
artifact there, tells Prefect to recompute (refresh_cache=True) instead of trusting the hit.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect.states import State

from storage.artifacts import ArtifactRef, ArtifactStore
from tasks.common import step_logger


def say(message: str) -> None:
    """One progress line: to the run's log (the UI) and to the CLI's progress logger."""
    step_logger().info(message)


def validated(task, store: ArtifactStore, step: str, key: str | None):
    """The task itself if its artifact (step, key) is complete in the store, else a recomputing copy."""
    if key is not None and store.find(step, key) is not None:
        return task
    return task.with_options(refresh_cache=True)


class StepReport:
    """Per-step final state (Completed / Cached / Failed), wall seconds and artifact, for the summary."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def run(self, name: str, task, store: ArtifactStore, step: str, key: str | None, *args, **kwargs) -> ArtifactRef:
        """Call the step in this thread and return its ref (raises the step's own error on failure)."""
        started = time.perf_counter()
        state = validated(task, store, step, key)(*args, return_state=True, **kwargs)
        self._record(name, state, time.perf_counter() - started)
        ref = state.result()  # re-raises the task's exception when it failed
        self._note_ref(name, ref)
        return ref

    def submit(self, name: str, task, store: ArtifactStore, step: str, key: str | None, *args, **kwargs):
        """Start the step on the flow's task runner; returns a future whose .result() is the ref."""
        started = time.perf_counter()
        future = validated(task, store, step, key).submit(*args, **kwargs)
        future.add_done_callback(lambda f: self._record(name, _final_state(f), time.perf_counter() - started))
        return _ReportingFuture(self, name, future)

    def add(self, name: str, state: str, seconds: float, ref: ArtifactRef | None = None, **extra: Any) -> None:
        with self._lock:
            self.steps.setdefault(name, {}).update(state=state, seconds=round(seconds, 3), **extra)
        if ref is not None:
            self._note_ref(name, ref)

    def _record(self, name: str, state, seconds: float) -> None:
        with self._lock:
            self.steps.setdefault(name, {}).update(state=state.name, seconds=round(seconds, 3),
                                                   task_run_id=str(state.state_details.task_run_id))
        say(f"{name}: {state.name} in {seconds:.1f} s")

    def _note_ref(self, name: str, ref: ArtifactRef) -> None:
        with self._lock:
            self.steps.setdefault(name, {}).update(step=ref.step, key=ref.key, uri=ref.uri, rows=ref.rows)


def _final_state(future) -> State:
    """The final state of a done task-runner future (its wrapped future's result is the State)."""
    outcome = getattr(future, "wrapped_future", None)
    if outcome is not None and outcome.done() and outcome.exception() is None:
        state = outcome.result()
        if isinstance(state, State):
            return state
    return future.state


class _ReportingFuture:
    def __init__(self, report: StepReport, name: str, future) -> None:
        self._report, self._name, self._future = report, name, future

    def result(self) -> ArtifactRef:
        ref = self._future.result()  # re-raises the task's exception when it failed
        self._report._note_ref(self._name, ref)
        return ref
