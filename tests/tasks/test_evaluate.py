"""Evaluation: metrics against a hand-computed confusion matrix, the artifact's files, Prefect artifacts."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactRef, ArtifactStore
from tasks.config import EvaluateConfig
from tests.tasks._training_data import GROUPS, publish_inputs, tiny_config


def test_metrics_match_a_hand_computed_confusion_matrix():
    from tasks.evaluate import classification_metrics, confusion_matrix

    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2]
    confusion = confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    m = classification_metrics(confusion)
    assert m["accuracy"] == pytest.approx(5 / 7)
    np.testing.assert_allclose(m["precision"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(m["recall"], [1 / 2, 1.0, 2 / 3])
    np.testing.assert_allclose(m["f1"], [0.5, 0.8, 0.8])
    assert m["macro_f1"] == pytest.approx(0.7)
    np.testing.assert_array_equal(m["support"], [2, 2, 3])


def test_a_class_never_seen_nor_predicted_scores_zero_and_counts_in_the_macro_average():
    from tasks.evaluate import classification_metrics, confusion_matrix

    m = classification_metrics(confusion_matrix([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], 4))
    assert (m["precision"][3], m["recall"][3], m["f1"][3], m["support"][3]) == (0.0, 0.0, 0.0, 0)
    assert m["macro_f1"] == pytest.approx(2.1 / 4)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert m["macro_f1"] == pytest.approx(
        sklearn.f1_score([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], average="macro", labels=[0, 1, 2, 3], zero_division=0))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from tasks.evaluate import evaluate
    from tasks.train import train

    home = str(tmp_path_factory.mktemp("home"))
    tokens, embeddings, documents = publish_inputs(home, seed=3)
    run = train.fn(tiny_config(), tokens, embeddings, data_home=home)
    ref = evaluate.fn(EvaluateConfig(), run, tokens, data_home=home)  # outside any Prefect run
    return home, run, tokens, ref, documents


def test_evaluation_files_agree_with_each_other(evaluated):
    home, run, tokens, ref, documents = evaluated
    store = ArtifactStore(home)
    out = store.local_dir(ref)
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    test_ids = [d for d, s in zip(documents["doc_id"].to_pylist(), documents["split"].to_pylist()) if s == "test"]
    assert [p["doc_id"] for p in predictions] == test_ids and metrics["documents"] == len(test_ids)
    label, predicted = np.array([p["label"] for p in predictions]), np.array([p["predicted"] for p in predictions])
    assert metrics["accuracy"] == pytest.approx(float((label == predicted).mean()))
    assert metrics["accuracy"] > 2 / len(GROUPS) and metrics["run"] == run.key  # twice chance; test_train covers learning
    for p in predictions:
        assert len(p["probabilities"]) == 4 and sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert p["confidence"] == pytest.approx(max(p["probabilities"])) and p["predicted"] == int(np.argmax(p["probabilities"]))

    confusion = pq.read_table(out / "confusion.parquet").to_pylist()
    assert len(confusion) == 16 and sum(c["count"] for c in confusion) == len(test_ids)
    for c in confusion:
        assert c["count"] == int(((label == c["true_label"]) & (predicted == c["predicted_label"])).sum())
        assert c["true_group"] == GROUPS[c["true_label"]]
    per_class = pq.read_table(out / "per_class.parquet").to_pylist()
    assert [r["group"] for r in per_class] == GROUPS
    assert [r["support"] for r in per_class] == [int((label == i).sum()) for i in range(4)]
    assert metrics["macro_f1"] == pytest.approx(np.mean([r["f1"] for r in per_class]))
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.read_manifest(ref)["upstream"][0]["key"] == run.key


def test_each_experts_own_test_accuracy_is_recorded(evaluated):
    from tasks.model import expert_probabilities, load_model
    from tasks.train import split_sequences

    home, run, tokens, ref, _ = evaluated
    store = ArtifactStore(home)
    metrics = store.read_json(ref, "metrics.json")
    table = pq.read_table(store.local_file(tokens, "sequences.parquet"))
    test = table.filter(np.asarray(table["split"].to_pylist()) == "test")
    probs = expert_probabilities(load_model(store.local_file(run, "model.keras")), split_sequences(test),
                                 store.read_manifest(run)["max_length"])
    label = test["label"].to_numpy()
    assert metrics["experts"] == ["lstm", "bow"] == store.read_manifest(run)["training"]["experts"]
    assert metrics["expert_accuracy"] == pytest.approx([float((probs[:, e].argmax(1) == label).mean()) for e in range(2)])


def test_evaluation_key_follows_run_and_config():
    from tasks import evaluate as evaluate_step

    run_a = ArtifactRef(step="train", key="a", uri="/x/train/a")
    run_b = ArtifactRef(step="train", key="b", uri="/x/train/b")
    tokens = ArtifactRef(step="tokens", key="t", uri="/x/tokens/t")
    assert evaluate_step.STEP.key(EvaluateConfig(), [run_a, tokens]) == evaluate_step.STEP.key(EvaluateConfig(), [run_a, tokens])
    assert evaluate_step.STEP.key(EvaluateConfig(), [run_a, tokens]) != evaluate_step.STEP.key(EvaluateConfig(), [run_b, tokens])


def test_prefect_artifacts_are_published_inside_a_flow_run(evaluated, prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.results import publish_results
    from tasks.evaluate import evaluate

    home, run, tokens, ref, _ = evaluated

    @flow
    def evaluate_flow():
        evaluation = evaluate(EvaluateConfig(), run, tokens, data_home=home, return_state=True).result()
        publish_results(ArtifactStore(home), evaluation)
        return evaluation

    state = evaluate_flow(return_state=True)
    assert state.result() == ref  # a store hit: the report is rebuilt from the stored files

    keys = ["evaluation-summary", "evaluation-per-class", "evaluation-confusion", "training-curves"]

    async def read():  # this flow run's artifacts only: other tests publish under the same keys
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    import asyncio

    artifacts = {a.key: a for a in asyncio.run(read())}
    assert set(artifacts) == set(keys)
    metrics = ArtifactStore(home).read_json(ref, "metrics.json")
    summary = artifacts["evaluation-summary"].data
    assert f"accuracy: **{metrics['accuracy']:.4f}**" in summary and run.key in summary
    assert all(f"| {group} |" in summary for group in GROUPS)
    table = artifacts["evaluation-per-class"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["group"] for row in table] == GROUPS

    confusion = artifacts["evaluation-confusion"].data  # a table a person can read, with the group names, and the image
    confusion_rows = pq.read_table(ArtifactStore(home).local_dir(ref) / "confusion.parquet").to_pylist()
    first = [c["count"] for c in confusion_rows if c["true_label"] == 0]
    assert f"| 1 {GROUPS[0]} | " + " | ".join(f"**{c}**" if j == 0 else (str(c) if c else "·") for j, c in enumerate(first)) \
        in confusion
    image = confusion.split("(data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"

    curves = artifacts["training-curves"].data
    curves = json.loads(curves) if isinstance(curves, str) else curves
    history = pq.read_table(ArtifactStore(home).local_dir(run) / "history.parquet").to_pylist()
    assert [row["epoch"] for row in curves] == [row["epoch"] for row in history]
    assert curves[-1]["val_loss"] == pytest.approx(history[-1]["val_loss"], abs=1e-4)
