"""The evaluation as Prefect artifacts on the flow run, where a person looks in the UI (the run's Artifacts tab).

    evaluation-summary     markdown: accuracy, macro-F1, the training (epochs, device, who trained it),
                           the sources used (URL, sha256), the configuration, per-class scores
    evaluation-per-class   table: precision, recall, F1, support per group
    evaluation-confusion   markdown: the most frequent confusions, the matrix as an image and as a table with
                           group names (the image: a PNG in a data: URI, which the UI draws; 34 KB for 20 groups)
    training-curves        table: loss, val_loss, accuracy, val_accuracy per epoch

All read from the stored artifacts (the evaluation, the run it evaluated, and the downloads at
the end of their lineage), so a run whose steps were all Cached, or whose training ran on another
worker, shows the same as the run that computed them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pyarrow as pa
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.steps import say
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.files import read_bytes
from tasks.evaluate import CONFUSION, PER_CLASS
from tasks.sweep import TABLE
from tasks.train import HISTORY

KEYS = ("evaluation-summary", "evaluation-per-class", "evaluation-confusion", "training-curves")
IMAGE_LIMIT = 256 * 1024  # a bigger PNG is linked by its path instead of embedded (every UI visit loads it)


def publish_results(store: ArtifactStore, evaluation: ArtifactRef | None, config: dict | None = None,
                    trained_by: str | None = None) -> None:
    """Publish the evaluation's artifacts on the current flow run and log its headline metrics.

    `config`: the configuration the run used (after environment overrides), shown in the summary;
    `trained_by`: a markdown line naming the training flow run, when it ran on a deployment.
    """
    if evaluation is None:
        return
    report = read_report(store, evaluation)
    metrics, run = report["metrics"], report["metrics"]["run"]
    say(f"results of run {run}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} on "
        f"{metrics['documents']} test documents ({evaluation.uri}); artifacts: {', '.join(KEYS)}")
    create_markdown_artifact(summary_markdown(report, evaluation, config, trained_by), key="evaluation-summary",
                             description=f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} of run {run}")
    create_table_artifact(report["per_class"], key="evaluation-per-class", description=f"per-class scores of run {run}")
    create_markdown_artifact(confusion_markdown(report, evaluation), key="evaluation-confusion",
                             description=f"confusion matrix of run {run} on the test split")
    if report["history"]:
        create_table_artifact(report["history"], key="training-curves", description=f"training curves of run {run}")


def publish_sweep(store: ArtifactStore, table: ArtifactRef) -> None:
    """The sweep's comparison table (one row per config: mean and standard deviation over seeds)."""
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for row in _rows(store, table, "table.parquet", TABLE)]
    create_table_artifact(rows, key="sweep-table", description=f"sweep {table.key}: test accuracy and macro-F1 per config, "
                                                               "mean and standard deviation over seeds")


def _rows(store: ArtifactStore, ref: ArtifactRef, name: str, schema: pa.Schema, columns: list[str] | None = None) -> list:
    """A small Parquet file's rows, read batch by batch: unlike read_parquet, this does not import pyarrow.dataset
    (and pandas with it), which would cost a cached rerun about half a second."""
    return [row for batch in store.iter_batches(ref, name, schema, columns) for row in batch.to_pylist()]


def read_report(store: ArtifactStore, evaluation: ArtifactRef) -> dict[str, Any]:
    """Everything the artifacts show, read from the store."""
    per_class = _rows(store, evaluation, "per_class.parquet", PER_CLASS)
    confusion = _rows(store, evaluation, "confusion.parquet", CONFUSION, ["true_label", "predicted_label", "count"])
    n = len(per_class)
    matrix = [[0] * n for _ in range(n)]
    for cell in confusion:
        matrix[cell["true_label"]][cell["predicted_label"]] = cell["count"]
    manifest = store.read_manifest(evaluation) or {}
    run = next((store.find(up["step"], up["key"]) for up in manifest.get("upstream", []) if up["step"] == "train"), None)
    history = _rows(store, run, "history.parquet", HISTORY) if run else []
    png = read_bytes(store.local_file(evaluation, "confusion.png")) if "confusion.png" in manifest.get("files", {}) else b""
    return {
        "metrics": store.read_json(evaluation, "metrics.json"),
        "per_class": [{"group": r["group"], **{c: round(r[c], 4) for c in ("precision", "recall", "f1")},
                       "support": r["support"]} for r in per_class],
        "confusion": matrix,
        "history": [{"epoch": r["epoch"], **{c: round(r[c], 4) for c in ("loss", "val_loss", "accuracy", "val_accuracy")},
                     "seconds": r["seconds"]} for r in history],
        "training": ((store.read_manifest(run) or {}).get("training") if run else None) or {},
        "sources": sources(store, evaluation),
        "png": png,
    }


def sources(store: ArtifactStore, evaluation: ArtifactRef) -> list[dict]:
    """The downloads at the end of the evaluation's lineage: file name, the URL it came from, its sha256."""
    found = {}
    for _, step, key, manifest in store.lineage(evaluation.step, evaluation.key):
        if step == "download" and manifest:
            found[key] = {"file": manifest.get("params", {}).get("name") or next(iter(manifest.get("files", {})), "?"),
                          "url": manifest.get("url") or manifest.get("params", {}).get("url"), "sha256": key,
                          "pinned": manifest.get("pinned"), "bytes": manifest.get("bytes")}
    return list(found.values())


def summary_markdown(report: dict, evaluation: ArtifactRef, config: dict | None, trained_by: str | None) -> str:
    m, t = report["metrics"], report["training"]
    lines = [f"# Evaluation of run `{m['run']}`", "",
             f"- accuracy: **{m['accuracy']:.4f}**", f"- macro-F1: **{m['macro_f1']:.4f}**",
             f"- test documents: {m['documents']} in {m.get('classes', len(report['per_class']))} groups",
             f"- evaluation: `{evaluation.uri}`"]
    if m.get("expert_accuracy"):
        lines.append("- each expert alone: " + ", ".join(f"{name} {acc:.4f}" for name, acc in
                                                      zip(m["experts"], m["expert_accuracy"], strict=False)))
    if t:
        epochs = t.get("epochs_run")
        lines.append(f"- training: {epochs} epoch{'' if epochs == 1 else 's'}, best epoch {t.get('best_epoch')} "
                     f"(validation accuracy {t.get('best_val_accuracy') or 0:.4f}), {t.get('seconds', 0):.0f} s on "
                     f"{t.get('device_name') or t.get('device')} ({t.get('backend')} backend)")
    if trained_by:
        lines.append(f"- trained by {trained_by}")
    lines += ["", "## Sources", ""]
    if report["sources"]:  # a list, not a table: a URL and a sha256 side by side overflow the page
        for s in report["sources"]:
            pinned = "pinned" if s["pinned"] else "not pinned: the sha256 it had when fetched"
            lines += [f"- **{s['file']}** from `{s['url']}`", f"  sha256 `{s['sha256']}` ({pinned})"]
    else:
        lines.append("(no download manifests in the lineage of this evaluation)")
    lines += ["", "## Per group", "", "| group | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['group']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
              for r in report["per_class"]]
    if config is not None:
        lines += ["", "## Configuration (after environment overrides)", "", "```json",
                  json.dumps(config, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def confusion_markdown(report: dict, evaluation: ArtifactRef) -> str:
    """The most frequent confusions, the image, then the full table (rows: true group; columns: predicted group,
    by number: the names would make 20 columns unreadably wide)."""
    names = [r["group"] for r in report["per_class"]]
    matrix = report["confusion"]
    lines = ["# Confusion matrix (test split)", ""]
    mistakes = sorted(((matrix[i][j], i, j) for i in range(len(names)) for j in range(len(names)) if i != j and matrix[i][j]),
                      reverse=True)[:10]
    if mistakes:
        lines += ["Most frequent confusions (true group → predicted group):", ""]
        lines += [f"- {names[i]} → {names[j]}: {count} of {report['per_class'][i]['support']}" for count, i, j in mistakes]
    png = report["png"]
    if png and len(png) <= IMAGE_LIMIT:
        lines += ["", f"![confusion matrix of run {report['metrics']['run']}]"
                      f"(data:image/png;base64,{base64.b64encode(png).decode()})"]
    elif png:
        lines += ["", f"Image: `{evaluation.uri}/confusion.png` ({len(png) // 1024} KB, too big to embed)"]
    lines += ["", "Rows: the true group; columns: the predicted group, numbered as the rows. The diagonal (bold) is right.",
              "", "| true \\ predicted | " + " | ".join(str(j + 1) for j in range(len(names))) + " | recall |",
              "| --- |" + " ---: |" * (len(names) + 1)]
    for i, name in enumerate(names):
        cells = [f"**{c}**" if i == j else (str(c) if c else "·") for j, c in enumerate(matrix[i])]
        lines.append(f"| {i + 1} {name} | " + " | ".join(cells) + f" | {report['per_class'][i]['recall']:.3f} |")
    return "\n".join(lines) + "\n"
