"""Train + evaluate as a flow of its own, so it can be deployed alone to a GPU work pool.

The pipeline runs the two steps itself by default, or hands them to a deployment of this flow
(e.g. "train-lstm/gpu") through `run_deployment`. Inputs and outputs are ArtifactRefs into a
data home both sides can reach (shared filesystem or object storage): the bytes never travel
through Prefect.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run as current_flow_run

from flows.results import publish_results
from flows.steps import StepRunner, say
from storage.artifacts import ArtifactRef
from storage.errors import PipelineError
from tasks import evaluate as evaluate_step
from tasks import train as train_step
from tasks.config import EvaluateConfig, TrainConfig

FLOW_NAME = "train-lstm"


@flow(name=FLOW_NAME, description="Train the LSTM on tokenized sequences + an embedding matrix, then evaluate it.")
def train_and_evaluate(
    train: TrainConfig,
    evaluate: EvaluateConfig,
    tokens: ArtifactRef,
    embeddings: ArtifactRef,
    data_home: str,
    until: Literal["train", "evaluate"] = "evaluate",
) -> dict[str, Any]:
    """Return the run's summary: {"artifacts": {"train": ref, "evaluate": ref}, "metrics": {...}, ...} (JSON-able).

    Args:
        train: Model and training settings (the pipeline's config.train).
        evaluate: Evaluation settings (the pipeline's config.evaluate).
        tokens: The tokens artifact to train on (written by the pipeline).
        embeddings: The embedding-matrix artifact to start from (written by the pipeline).
        data_home: The data home both the pipeline and this worker reach (shared path or object store).
        until: Stop after train, or also evaluate.
    """
    started = time.perf_counter()
    run = StepRunner(data_home, until)
    evaluation = train_then_evaluate(run, None, train, evaluate, tokens, embeddings)
    publish_results(run.store, evaluation, config={"train": train.model_dump(mode="json"),
                                                   "evaluate": evaluate.model_dump(mode="json")})
    return run.summary(started)


def train_then_evaluate(run: StepRunner, deployment: str | None, train: TrainConfig, evaluate: EvaluateConfig,
                        tokens: ArtifactRef | None, embeddings: ArtifactRef | None) -> ArtifactRef | None:
    """The train and evaluate steps, in this process or through `deployment`; the evaluation ref."""
    if deployment:
        return train_on_deployment(run, deployment, train, evaluate, tokens, embeddings)
    model = run(train_step.train, train, tokens, embeddings)
    return run(evaluate_step.evaluate, evaluate, model, tokens)


def train_on_deployment(run: StepRunner, deployment: str, train: TrainConfig, evaluate: EvaluateConfig,
                        tokens: ArtifactRef | None, embeddings: ArtifactRef | None) -> ArtifactRef | None:
    """Train (+ evaluate) through a deployment of train_and_evaluate, e.g. on the GPU pool; the evaluation ref.

    run_deployment does not raise when the child fails, so its final state is checked here;
    the idempotency key stops a retried parent from starting a second training run.
    """
    if tokens is None or embeddings is None or not run.wanted("train"):
        return None
    from prefect.deployments import run_deployment
    from prefect.utilities.urls import url_for

    run_key = train_step.STEP.key(train, [tokens, embeddings])
    say(f"train: submitting to deployment {deployment} (run key {run_key})")
    started = time.perf_counter()
    until = "evaluate" if run.wanted("evaluate") else "train"
    child = run_deployment(
        deployment,
        parameters={"train": train.model_dump(mode="json"), "evaluate": evaluate.model_dump(mode="json"),
                    "tokens": tokens.model_dump(mode="json"), "embeddings": embeddings.model_dump(mode="json"),
                    "data_home": run.home, "until": until},
        idempotency_key=f"{current_flow_run.id or 'no-parent'}-train-{run_key}",
        poll_interval=2,  # the default 5 s adds up to 5 s to every run, cached ones included
    )
    state, ui_url = child.state, url_for(child)
    say(f"train: flow run {child.name} of {deployment} on work pool {child.work_pool_name} ended "
        f"{state.name if state else 'unknown'}: {ui_url or child.id}")
    if state is None or not state.is_completed():
        raise PipelineError(f"training deployment {deployment} (flow run {child.name}, pool {child.work_pool_name}) ended "
                            f"{state.name if state else 'unknown'}: {(state.message if state else None) or 'no message'}"
                            f" ({ui_url or child.id})")
    where = {"flow_run": child.name, "work_pool": child.work_pool_name, "deployment": deployment, "ui_url": ui_url}
    model = run.add("train", state.name, time.perf_counter() - started, _shared(run, deployment, "train", run_key), **where)
    if until == "train":
        return None
    evaluation = _shared(run, deployment, "evaluate", evaluate_step.STEP.key(evaluate, [model, tokens]))
    return run.add("evaluate", state.name, 0.0, evaluation, **where)


def _shared(run: StepRunner, deployment: str, step: str, key: str) -> ArtifactRef:
    """The artifact the deployment wrote, as this process sees the data home."""
    ref = run.store.find(step, key)
    if ref is None:
        raise PipelineError(f"training deployment {deployment} completed but {run.store.uri(step, key)} is missing: "
                            "the worker must use the same data home (shared filesystem or object storage)")
    return ref
