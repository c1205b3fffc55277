"""What every pipeline step shares: its name, its artifact key, the cache decision, retries, logging.

A step is described once, by `Step(name, version)`: the name is the task's name, the artifact
directory (`<data home>/<name>/<key>/`) and the step's name in summaries. Its key hashes
(name, version, the step's own config, upstream keys) and is the step's only cache key:

- the store decides. If the data home holds a complete artifact under the key, the task returns
  it at once in a state named "Cached", on any worker that sees the data home, including one
  that never ran the step. Prefect's own result cache is off (cache_policy=NO_CACHE): its records
  live in each worker's PREFECT_HOME and can outlive the artifact they point to;
- otherwise the task builds the artifact and publishes it atomically.

Flows call step tasks with `return_state=True` or `.submit()` (flows.steps) and take the artifact
from the state: a plain call of a Cached step returns the state itself (Prefect hands back a
task's returned state as is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Completed, State
from pydantic import BaseModel

from storage.artifacts import ArtifactRef, ArtifactStore, artifact_key
from storage.errors import TransientError
from storage.files import Staging, is_write_error, write_error
from tasks.progress import PROGRESS_LOGGER  # the CLI prints this logger's records as progress lines and bars

Build = Callable[[ArtifactStore, Staging], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Step:
    name: str  # task name = artifact directory = name in summaries
    version: int  # bump when the same inputs would now give a different artifact

    def key(self, params: BaseModel | Mapping[str, Any], upstream: Sequence[ArtifactRef] = ()) -> str:
        return artifact_key(self.name, self.version, _params(params), upstream)

    def cached(self, store: ArtifactStore, key: str | None) -> State | ArtifactRef | None:
        """The artifact if the store has it complete (inside a task run: a "Cached" state holding it), else None."""
        ref = store.find(self.name, key) if key else None
        if ref is None or TaskRunContext.get() is None:  # outside a run (`.fn` calls) there is no state to name
            return ref
        return Completed(name="Cached", data=ref, message=f"artifact {ref.uri}")

    def run(self, data_home: str | None, params: BaseModel | Mapping[str, Any], upstream: Sequence[ArtifactRef],
            build: Build) -> ArtifactRef | State:
        """The body of a step task: the cached artifact, or build(store, staging) published under the key."""
        store = ArtifactStore(data_home)
        key = self.key(params, upstream)
        if cached := self.cached(store, key):
            return cached
        try:
            return store.publish(self.name, key, lambda staging: build(store, staging), version=self.version,
                                 params=_params(params), upstream=upstream)
        except OSError as exc:  # a write outside Staging's own (Keras, matplotlib, the manifest): name the artifact
            if not is_write_error(exc):
                raise
            raise write_error(exc, store.uri(self.name, key), "write the artifact") from exc

    def task(self, fn: Callable | None = None, *, retries: int = 2, retry_delay_seconds: list[float] | None = None,
             **options: Any) -> Callable:
        """Decorator: the step's Prefect task (retries only what can succeed on retry)."""
        def wrap(fn: Callable):
            return task(
                fn, name=self.name, cache_policy=NO_CACHE, persist_result=False, retries=retries,
                retry_delay_seconds=[5, 30] if retry_delay_seconds is None else retry_delay_seconds,
                retry_condition_fn=retry_if_transient, **options,
            )

        return wrap(fn) if fn is not None else wrap


def _params(params: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    return params.model_dump(mode="json") if isinstance(params, BaseModel) else dict(params)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError))


def retry_if_transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry timeouts, resets and 5xx only; never a checksum, 404 or bad input.

    Prefect does not retry if this function raises, so it must not.
    """
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classification only
        return is_transient(exc)
    return False


class _Tee:
    """Sends each log call to several loggers."""

    def __init__(self, *loggers: logging.Logger | logging.LoggerAdapter):
        self._loggers = loggers

    def __getattr__(self, level: str) -> Callable:
        def log(msg, *args, **kwargs) -> None:
            for logger in self._loggers:
                getattr(logger, level)(msg, *args, **kwargs)

        return log


def step_logger() -> logging.Logger | _Tee:
    """Progress of a step: to Prefect's run log (the UI) inside a run, and to the CLI's progress lines."""
    progress = logging.getLogger(PROGRESS_LOGGER)
    if TaskRunContext.get() or FlowRunContext.get():
        return _Tee(get_run_logger(), progress)
    return progress
