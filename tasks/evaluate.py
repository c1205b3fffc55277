"""A run + its tokens -> evaluate/<key>/: test-split metrics, confusion matrix, predictions.

metrics.json (accuracy, macro-F1, counts), per_class.parquet (precision/recall/F1/support),
confusion.parquet (long form: one row per true x predicted pair) + confusion.png, and
predictions.parquet (one row per test document). The flow publishes them as Prefect artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import InputFormatError
from storage.files import Staging
from tasks.config import EvaluateConfig
from tasks.step import Step, step_logger

PER_CLASS = pa.schema(
    [
        ("label", pa.int16()),
        ("group", pa.string()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("f1", pa.float64()),
        ("support", pa.int64()),
    ]
)
CONFUSION = pa.schema(
    [
        ("true_label", pa.int16()),
        ("true_group", pa.string()),
        ("predicted_label", pa.int16()),
        ("predicted_group", pa.string()),
        ("count", pa.int64()),
    ]
)
PREDICTIONS = pa.schema(
    [
        ("doc_id", pa.string()),
        ("label", pa.int16()),
        ("predicted", pa.int16()),
        ("confidence", pa.float32()),
        ("probabilities", pa.list_(pa.float32())),
    ]
)


# -- pure functions ---------------------------------------------------------------------------------
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return counts


def classification_metrics(confusion: np.ndarray) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    A class never predicted has precision 0; a class absent from the test set has recall 0
    (sklearn's zero_division=0), and it still counts in the macro average.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = confusion.sum()
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(np.int64),
        "documents": int(total),
    }


def per_class_table(metrics: dict, names: Sequence[str]) -> pa.Table:
    return pa.table(
        {
            "label": pa.array(np.arange(len(names)), pa.int16()),
            "group": list(names),
            "precision": metrics["precision"],
            "recall": metrics["recall"],
            "f1": metrics["f1"],
            "support": metrics["support"],
        },
        schema=PER_CLASS,
    )


def confusion_table(confusion: np.ndarray, names: Sequence[str]) -> pa.Table:
    n = len(names)
    true, pred = np.divmod(np.arange(n * n), n)
    return pa.table(
        {
            "true_label": pa.array(true, pa.int16()),
            "true_group": [names[i] for i in true],
            "predicted_label": pa.array(pred, pa.int16()),
            "predicted_group": [names[i] for i in pred],
            "count": confusion.reshape(-1),
        },
        schema=CONFUSION,
    )


def plot_confusion(confusion: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> None:
    """Row-normalised heat map (recall on the diagonal) with the raw counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    # 64 colours: a fraction of the size (38 KB instead of 139 KB for 20 groups), small enough to embed in the UI
    image.quantize(colors=64).save(path, format="PNG", optimize=True)


def markdown_report(metrics: dict, names: Sequence[str], run_key: str) -> str:
    lines = [
        f"# Evaluation of run `{run_key}`",
        "",
        f"- test documents: {metrics['documents']}",
        f"- accuracy: **{metrics['accuracy']:.4f}**",
        f"- macro-F1: **{metrics['macro_f1']:.4f}**",
        "",
        "| group | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {metrics['precision'][i]:.3f} | {metrics['recall'][i]:.3f} | "
                     f"{metrics['f1'][i]:.3f} | {metrics['support'][i]} |")
    return "\n".join(lines) + "\n"


# -- step -------------------------------------------------------------------------------------------
STEP = Step("evaluate", version=2)  # 2: each expert's accuracy in metrics.json


def write_evaluation(cfg: EvaluateConfig, store: ArtifactStore, run: ArtifactRef, tokens: ArtifactRef, out: Staging) -> dict:
    from tasks.model import load_model, predict_proba  # imports Keras
    from tasks.train import split_rows, split_sequences

    names = store.read_json(run, "labels.json")
    manifest = store.read_manifest(run) or {}
    max_length = int(manifest.get("max_length") or 0) or None
    model = load_model(store.local_file(run, "model.keras"))
    experts = (manifest.get("training") or {}).get("experts") or []
    confusion, expert_hits = np.zeros((len(names), len(names)), dtype=np.int64), np.zeros(len(experts), dtype=np.int64)
    with out.parquet_writer("predictions.parquet", PREDICTIONS) as writer:  # a row group of test documents at a time
        for test in split_rows(store, tokens, ["doc_id", "label", "ids"]):
            if test.num_rows == 0:
                continue
            sequences = split_sequences(test)
            width = max_length or max(len(s) for s in sequences) or 1
            probabilities = predict_proba(model, sequences, width, cfg.batch_size)
            y_true = test["label"].to_numpy(zero_copy_only=False).astype(np.int64)
            confusion += confusion_matrix(y_true, probabilities.argmax(axis=1), len(names))
            expert_hits += expert_correct(model, experts, sequences, y_true, width, cfg.batch_size)
            writer.write_table(predictions_table(test["doc_id"], y_true, probabilities))
    if confusion.sum() == 0:
        raise InputFormatError(f"{tokens.file('sequences.parquet')}: no rows with split 'test' to evaluate on")
    metrics = classification_metrics(confusion)

    out.write_parquet("per_class.parquet", per_class_table(metrics, names), PER_CLASS)
    out.write_parquet("confusion.parquet", confusion_table(confusion, names), CONFUSION)
    plot_confusion(confusion, names, out.path("confusion.png"), title=f"run {run.key}: accuracy {metrics['accuracy']:.3f}")
    headline = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "documents": metrics["documents"],
                "classes": len(names), "run": run.key}
    if len(experts) > 1:
        headline.update(experts=experts, expert_accuracy=(expert_hits / metrics["documents"]).tolist())
    out.write_json("metrics.json", headline)
    step_logger().info("evaluation of run %s: accuracy %.4f, macro-F1 %.4f on %d test documents",
                       run.key, metrics["accuracy"], metrics["macro_f1"], metrics["documents"])
    return {"rows": metrics["documents"], "metrics": headline}


def expert_correct(model, experts: list[str], sequences, y_true: np.ndarray, max_length: int, batch_size: int) -> np.ndarray:
    """How many of these documents each expert alone classifies right, for a product of several experts (what each
    contributes: the product should beat the best of them); zeros for a single expert or an older run."""
    from tasks.model import expert_probabilities

    if len(experts) < 2:
        return np.zeros(len(experts), dtype=np.int64)
    probs = expert_probabilities(model, sequences, max_length, batch_size)
    return np.array([int((probs[:, e].argmax(1) == y_true).sum()) for e in range(len(experts))], dtype=np.int64)


def predictions_table(doc_ids: pa.ChunkedArray, y_true: np.ndarray, probabilities: np.ndarray) -> pa.Table:
    classes = probabilities.shape[1]
    return pa.table(
        {
            "doc_id": doc_ids,
            "label": pa.array(y_true, pa.int16()),
            "predicted": pa.array(probabilities.argmax(axis=1), pa.int16()),
            "confidence": pa.array(probabilities.max(axis=1), pa.float32()),
            "probabilities": pa.FixedSizeListArray.from_arrays(probabilities.astype(np.float32).reshape(-1), classes)
            .cast(pa.list_(pa.float32())),
        },
        schema=PREDICTIONS,
    )


@STEP.task
def evaluate(cfg: EvaluateConfig, run: ArtifactRef, tokens: ArtifactRef, data_home: str | None = None) -> ArtifactRef:
    return STEP.run(data_home, cfg, [run, tokens], lambda store, out: write_evaluation(cfg, store, run, tokens, out))
