"""Running step tasks from a flow: stop after a stage, wait for upstream steps, report each step.

The cache decision is the step's own (tasks.step): this module only calls the tasks, in this
thread or on the flow's task runner, and keeps a per-step record (Completed / Cached, seconds,
artifact) for the summary the CLI prints.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect.states import State

from flows.stages import STAGE_OF_STEP, STAGES, STEP_ORDER
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import PipelineError
from tasks.step import Step, step_logger


def say(message: str) -> None:
    """One progress line: to the run's log (the UI) and to the CLI's progress logger."""
    step_logger().info(message)


class StepRunner:
    """Calls step tasks for one flow run. A step past `until`, or whose input was skipped, is skipped (None)."""

    def __init__(self, data_home: str, until: str = "evaluate"):
        self.home, self.until = data_home, until
        self.store = ArtifactStore(data_home)
        self.steps: dict[str, dict[str, Any]] = {}
        self.refs: dict[str, ArtifactRef] = {}
        self._submitted: list[StepFuture] = []
        self._lock = threading.Lock()

    def wanted(self, step: str) -> bool:
        return STAGES.index(STAGE_OF_STEP[step]) <= STAGES.index(self.until)

    def __call__(self, task, *inputs, name: str | None = None) -> ArtifactRef | None:
        """Run the step in this thread; its artifact, or None if skipped. Raises the step's own error."""
        name = name or task.name
        args = self._resolve(inputs)
        if args is None or not self.wanted(task.name):
            return None
        started = time.perf_counter()
        state = task(*args, data_home=self.home, return_state=True)
        self._record(name, state, time.perf_counter() - started)
        return self._note(name, state.result())

    def shards(self, subflow, step: Step, cfg: Any, upstream: StepFuture | ArtifactRef | None, *inputs) -> list | None:
        """Run `subflow` (which builds the shards of `step`) unless the store already holds the step's artifact.

        Its result ([] when skipped) goes to the step's task; its time counts in the step's seconds (and is
        recorded alone as shard_seconds).
        """
        args = self._resolve((upstream, *inputs))
        if args is None or not self.wanted(step.name):
            return None
        if self.store.find(step.name, step.key(cfg, [args[0]])):
            return []
        started = time.perf_counter()
        result = subflow(cfg, *args, data_home=self.home)
        with self._lock:
            self.steps.setdefault(step.name, {})["shard_seconds"] = round(time.perf_counter() - started, 3)
        return result

    def submit(self, task, *inputs, name: str | None = None) -> StepFuture | None:
        """Start the step on the flow's task runner (upstream steps are waited for first)."""
        name = name or task.name
        args = self._resolve(inputs)
        if args is None or not self.wanted(task.name):
            return None
        started = time.perf_counter()
        future = task.submit(*args, data_home=self.home)
        future.add_done_callback(lambda f: self._record(name, _final_state(f), time.perf_counter() - started))
        self._submitted.append(StepFuture(self, name, future))
        return self._submitted[-1]

    def add(self, name: str, state: str, seconds: float, ref: ArtifactRef, **extra: Any) -> ArtifactRef:
        """Record a step that ran elsewhere (e.g. on a training deployment)."""
        with self._lock:
            self.steps.setdefault(name, {}).update(state=state, seconds=round(seconds, 3), **extra)
        return self._note(name, ref)

    def summary(self, started: float) -> dict[str, Any]:
        """What the flow returns, once every submitted step has finished (raising the first failure)."""
        for future in self._submitted:
            future.result()
        evaluation = self.refs.get("evaluate")
        metrics = self.store.read_json(evaluation, "metrics.json") if evaluation else {}
        order = {name: i for i, name in enumerate(STEP_ORDER)}
        return {
            "flow_run": flow_run_info(),
            "data_home": self.home,
            "until": self.until,
            "artifacts": {name: ref.model_dump(mode="json") for name, ref in self.refs.items()},
            "metrics": metrics,
            "steps": {name: self.steps[name] for name in sorted(self.steps, key=lambda n: order.get(n, len(order)))},
            "seconds": round(time.perf_counter() - started, 3),
        }

    def trained_by(self) -> str | None:
        """A markdown line naming the flow run that trained the model, when a deployment did (add(flow_run=...))."""
        train = self.steps.get("train", {})
        if not train.get("flow_run"):
            return None
        name = f"[{train['flow_run']}]({train['ui_url']})" if train.get("ui_url") else f"`{train['flow_run']}`"
        return f"flow run {name} of deployment `{train.get('deployment')}` on work pool `{train.get('work_pool')}`"

    def _resolve(self, inputs: tuple) -> list | None:
        args = []
        for value in inputs:
            if isinstance(value, StepFuture):
                value = value.result()
            if value is None:
                return None
            args.append(value)
        return args

    def _record(self, name: str, state: State, seconds: float) -> None:
        with self._lock:
            step = self.steps.setdefault(name, {})
            seconds += step.get("shard_seconds", 0.0)  # a step built in shards took them as well
            step.update(state=state.name, seconds=round(seconds, 3), task_run_id=str(state.state_details.task_run_id))
        say(f"{name}: {state.name} in {seconds:.1f} s")

    def _note(self, name: str, ref: ArtifactRef) -> ArtifactRef:
        if not isinstance(ref, ArtifactRef):
            raise PipelineError(f"step {name} returned {type(ref).__name__}, not an artifact reference")
        with self._lock:
            self.refs[name] = ref
            self.steps.setdefault(name, {}).update(step=ref.step, key=ref.key, uri=ref.uri, rows=ref.rows)
        return ref


def flow_run_info() -> dict[str, Any]:
    """This flow run's name, id and UI address (None outside a run)."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    return {"name": flow_run.name, "id": flow_run.id,
            "ui_url": url_for("flow-run", obj_id=flow_run.id) if flow_run.id else None}


class StepFuture:
    def __init__(self, runner: StepRunner, name: str, future) -> None:
        self._runner, self._name, self._future = runner, name, future

    def result(self) -> ArtifactRef:
        return self._runner._note(self._name, self._future.result())  # re-raises the step's own error


def _final_state(future) -> State:
    """The final state of a done task-runner future (its wrapped future's result is the State)."""
    outcome = getattr(future, "wrapped_future", None)
    if outcome is not None and outcome.done() and outcome.exception() is None:
        state = outcome.result()
        if isinstance(state, State):
            return state
    return future.state
