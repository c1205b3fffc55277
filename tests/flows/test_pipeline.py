"""The pipeline flow under a real (test) Prefect API on tiny data: caching, invalidation, retries."""

from __future__ import annotations

import json
import shutil

import pytest

from storage.artifacts import ArtifactStore
from storage.errors import TransientError

pytestmark = pytest.mark.usefixtures("prefect_api")

ALL_STEPS = ["download-glove", "download-corpus", "corpus", "glove", "tokens", "embeddings", "train", "evaluate"]


def states(summary: dict) -> dict[str, str]:
    return {name: step["state"] for name, step in summary["steps"].items()}


def test_second_run_is_cached_and_changes_rerun_only_what_depends_on_them(tiny_config):
    from prefect import get_client

    from flows.pipeline import pipeline

    first = pipeline(tiny_config)
    assert states(first) == {name: "Completed" for name in ALL_STEPS}
    assert 0.0 <= first["metrics"]["accuracy"] <= 1.0
    store = ArtifactStore(tiny_config.data_home)
    for step in first["steps"].values():
        assert store.find(step["step"], step["key"], verify=True) is not None

    second = pipeline(tiny_config)
    assert states(second) == {name: "Cached" for name in ALL_STEPS}
    with get_client(sync_client=True) as client:  # as the Prefect API (and UI) records them
        recorded = {client.read_task_run(step["task_run_id"]).state.name for step in second["steps"].values()}
    assert recorded == {"Cached"}
    assert second["artifacts"] == first["artifacts"]

    # One training parameter: only train and evaluate run again.
    changed = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"seed": 7})})
    third = pipeline(changed)
    assert {n for n, s in states(third).items() if s != "Cached"} == {"train", "evaluate"}
    assert states(third)["train"] == "Completed"
    assert third["artifacts"]["train"]["key"] != first["artifacts"]["train"]["key"]

    # A deleted artifact behind a cache entry is rebuilt, not returned as a dangling ref.
    tokens = first["artifacts"]["tokens"]
    shutil.rmtree(tokens["uri"])
    fourth = pipeline(tiny_config)
    assert states(fourth)["tokens"] == "Completed"
    assert {n for n, s in states(fourth).items() if s != "Cached"} == {"tokens"}
    assert store.find("tokens", tokens["key"], verify=True) is not None


def test_a_transient_failure_is_retried_and_then_succeeds(tiny_config, monkeypatch):
    from prefect import get_client

    from flows import pipeline as pipeline_module
    from flows.pipeline import pipeline
    from tasks import corpus

    calls = []
    real_build = corpus.build_documents

    def flaky_build(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("simulated network hiccup")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(corpus, "build_documents", flaky_build)
    monkeypatch.setattr(pipeline_module, "corpus", corpus.corpus.with_options(retry_delay_seconds=0))
    summary = pipeline(tiny_config, until="data")

    assert len(calls) == 2
    step = summary["steps"]["corpus"]
    assert step["state"] == "Completed"
    with get_client(sync_client=True) as client:
        history = [s.name for s in client.read_task_run_states(step["task_run_id"])]
    assert "Retrying" in history or "AwaitingRetry" in history
    assert history[-1] == "Completed"


def test_a_permanent_failure_fails_the_flow_without_retry(tiny_config):
    from flows.pipeline import pipeline
    from storage.errors import ChecksumMismatch

    wrong = tiny_config.sources.corpus_file.model_copy(update={"sha256": "0" * 64})
    config = tiny_config.model_copy(update={"sources": tiny_config.sources.model_copy(update={"corpus_source": wrong})})
    with pytest.raises(ChecksumMismatch):
        pipeline(config, until="data")


@pytest.mark.parametrize("outcome", ["failed", "completed-elsewhere"])
def test_training_deployment_outcome_is_checked(tiny_config, monkeypatch, outcome):
    """run_deployment does not raise: a failed child, or one whose artifacts are not in our data home,
    must fail the parent with a message saying why."""
    import uuid

    import prefect.deployments
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Completed, Failed

    from flows.pipeline import pipeline
    from storage.errors import PipelineError

    calls = []

    def fake_run_deployment(name, parameters=None, idempotency_key=None, **_):
        json.dumps(parameters)  # parameters travel through the API: JSON only
        calls.append((name, parameters, idempotency_key))
        state = Failed(message="Flow run encountered an exception: TrainingDiverged: loss became NaN in epoch 2") \
            if outcome == "failed" else Completed()
        return FlowRun(flow_id=uuid.uuid4(), name="gentle-otter", state=state, work_pool_name="gpu")

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    with pytest.raises(PipelineError) as error:
        pipeline(tiny_config, train_deployment="train-lstm/gpu")
    message = str(error.value)
    if outcome == "failed":
        assert "TrainingDiverged: loss became NaN in epoch 2" in message and "gentle-otter" in message
    else:
        assert "same data home" in message
    (name, parameters, key), = calls
    assert name == "train-lstm/gpu" and "deployment" not in parameters["train"]
    assert parameters["data_home"] == tiny_config.data_home and "-train-" in key
