"""The evaluation as Prefect artifacts on the flow run, so a person sees the results in the UI.

Read from the evaluation artifact's files, so a run whose steps were all Cached, or whose
training ran on another worker, publishes the same artifacts as the run that computed them.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.artifacts import ArtifactRef, ArtifactStore
from tasks.evaluate import PER_CLASS, markdown_report
from tasks.sweep import TABLE


def publish_results(store: ArtifactStore, evaluation: ArtifactRef | None) -> None:
    if evaluation is None:
        return
    headline = store.read_json(evaluation, "metrics.json")
    per_class = store.read_parquet(evaluation, "per_class.parquet", PER_CLASS)
    names = per_class["group"].to_pylist()
    metrics = {**headline, **{c: per_class[c].to_numpy() for c in ("precision", "recall", "f1", "support")}}
    rows = [{"group": name, **{c: round(float(metrics[c][i]), 4) for c in ("precision", "recall", "f1")},
             "support": int(metrics["support"][i])} for i, name in enumerate(names)]
    create_table_artifact(rows, key="evaluation-per-class", description=f"per-class metrics of run {headline['run']}")
    report = markdown_report(metrics, names, headline["run"]) + f"\nConfusion matrix: `{evaluation.uri}/confusion.png`\n"
    create_markdown_artifact(report, key="evaluation-summary", description=f"accuracy and macro-F1 of run {headline['run']}")


def publish_sweep(store: ArtifactStore, table: ArtifactRef) -> None:
    """The sweep's comparison table (one row per config: mean and standard deviation over seeds)."""
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for row in store.read_parquet(table, "table.parquet", TABLE).to_pylist()]
    create_table_artifact(rows, key="sweep-table", description=f"sweep {table.key}: test accuracy and macro-F1 per config, "
                                                               "mean and standard deviation over seeds")
