"""What every step task shares: the Prefect task options, the retry rule, and logging.

Steps return ArtifactRefs, so Prefect results stay tiny (JSON), and the cache policy keys on
the step's inputs (its own sub-config + upstream refs) plus the task's source: identical
inputs are Cached across runs. The flow additionally sets refresh_cache when the artifact
behind a would-be cache hit is gone from the store, so a hit never returns a dangling ref.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.context import TaskRunContext, FlowRunContext
from prefect.logging import get_run_logger

from storage.errors import TransientError

STEP_CACHE_POLICY = INPUTS + TASK_SOURCE
PROGRESS_LOGGER = "newsgroups_lstm.progress"  # the CLI prints this logger's records as progress lines


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


def step_task(name: str, *, retries: int = 2, retry_delay_seconds: list[float] | None = None) -> Callable:
    """The @task used by every pipeline step."""
    return task(
        name=name,
        cache_policy=STEP_CACHE_POLICY,
        persist_result=True,
        result_serializer="json",
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds if retry_delay_seconds is not None else [5, 30],
        retry_condition_fn=retry_if_transient,
    )


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
