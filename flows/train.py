"""Train + evaluate as a flow of its own, so it can be deployed alone to a GPU work pool.

The pipeline calls it in-process by default, or through `run_deployment` when
config.train.deployment names a deployment of it (e.g. "train-lstm/gpu"). Its inputs and
outputs are ArtifactRefs into a data home both sides can reach (shared filesystem or
object storage): the bytes never travel through Prefect.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from prefect import flow

from storage.artifacts import ArtifactRef, ArtifactStore
from tasks.config import EvaluateConfig, TrainConfig

from flows.steps import StepReport, say

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
    """Return {"run": ref, "evaluation": ref | None, "metrics": {...}, "steps": {...}} (JSON-able)."""
    from tasks import evaluate as evaluate_step
    from tasks import train as train_step

    store = ArtifactStore(data_home)
    report = StepReport()
    run = report.run(
        "train", train_step.train, store, train_step.STEP, train_step.run_key(train, tokens, embeddings),
        train, tokens, embeddings, data_home=data_home,
    )
    result: dict[str, Any] = {"run": run.model_dump(mode="json"), "evaluation": None, "metrics": {}}
    if until == "evaluate":
        evaluation = report.run(
            "evaluate", evaluate_step.evaluate, store, evaluate_step.STEP,
            evaluate_step.evaluation_key(evaluate, run, tokens),
            evaluate, run, tokens, data_home=data_home,
        )
        result["evaluation"] = evaluation.model_dump(mode="json")
        result["metrics"] = read_metrics(store, evaluation)
        if result["metrics"]:
            say("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float)))
    result["steps"] = report.steps
    return result


def read_metrics(store: ArtifactStore, evaluation: ArtifactRef) -> dict[str, Any]:
    """The scalar metrics of an evaluation (metrics.json), without per-class detail."""
    path = store.local_dir(evaluation) / "metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
