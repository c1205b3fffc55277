"""tokens + embeddings -> train/<key>/: a trained Keras classifier that can classify raw text on its own.

The run directory holds model.keras, history.parquet + curves.png (training curves),
labels.json (group name of every label), and copies of the tokens artifact's vocab.parquet
and tokenizer.json, so tasks/predict.py needs nothing but the run directory.

The model and the training loop live in tasks/model/ (pure Keras, any backend); this
module reads the artifacts, calls it, and writes the run. Training checkpoints go to the
store's work_dir for the run key: a killed or retried training resumes from its last
finished epoch, and the checkpoints are discarded once the run is published.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.checkpoints import CheckpointDir
from storage.download import stop_requested
from storage.errors import InputFormatError, Interrupted, PipelineError, TrainingDiverged
from storage.files import Staging, iter_row_groups, parquet_row_groups
from storage.schemas import DOCUMENTS, SEQUENCES
from tasks.config import TrainConfig
from tasks.progress import Reporter
from tasks.step import Step, step_logger

HISTORY = pa.schema(
    [
        ("epoch", pa.int32()),
        ("loss", pa.float64()),
        ("accuracy", pa.float64()),
        ("val_loss", pa.float64()),
        ("val_accuracy", pa.float64()),
        ("learning_rate", pa.float64()),
        ("seconds", pa.float64()),
        ("expert_weights", pa.list_(pa.float64())),  # weight of each expert in the classifier after this epoch
        ("expert_val_accuracy", pa.list_(pa.float64())),
    ]
)


# -- pure functions ---------------------------------------------------------------------------------
def split_sequences(table: pa.Table) -> list[np.ndarray]:
    """The `ids` column as one int32 array per row (views into a single buffer, no Python loop per id)."""
    ids = table["ids"].combine_chunks() if isinstance(table["ids"], pa.ChunkedArray) else table["ids"]
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    values = values[offsets[0] : offsets[-1]]
    return np.split(values, offsets[1:-1] - offsets[0])


def posting_order(doc_ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A key that increases with posting time within a group, from doc_id "<split>/<group>/<file name>".

    20news-bydate has no Date: headers (they were removed), but its file names are the articles'
    numbers on the news server, which grow with arrival time within a group (a table's doc_id ends in
    its row number). Names that are not all numbers are ranked in natural order ("a2" < "a10"), the
    closest a folder of files gets to a time.
    """
    if not isinstance(doc_ids, (pa.Array, pa.ChunkedArray)):
        doc_ids = pa.array(list(doc_ids), pa.string())
    names = pc.replace_substring_regex(doc_ids, r"^.*/", "")
    if len(names) == 0 or (pc.all(pc.ascii_is_decimal(names)).as_py() and pc.max(pc.utf8_length(names)).as_py() <= 18):
        return np.asarray(pc.cast(names, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    names = names.to_pylist()
    natural = [tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|\D+", name))
               for name in names]
    ranks = np.empty(len(names), dtype=np.int64)
    ranks[sorted(range(len(names)), key=natural.__getitem__)] = np.arange(len(names))
    return ranks


def history_table(history: Sequence[dict]) -> pa.Table:
    return pa.table({name: [row.get(name) for row in history] for name in HISTORY.names}, schema=HISTORY)


def plot_curves(history: Sequence[dict], path: str | Path, title: str = "training") -> None:
    """Loss and accuracy per epoch, training vs validation slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, [row[metric] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split_rows(store: ArtifactStore, tokens: ArtifactRef, columns: list[str], split: str = "test") -> Iterator[pa.Table]:
    """The rows of one split of sequences.parquet, a row group at a time (memory: one row group)."""
    path = store.local_file(tokens, "sequences.parquet")
    for group in range(parquet_row_groups(path)):
        batches = [batch for _, batch in iter_row_groups(path, SEQUENCES, [group], list({*columns, "split"}), 1 << 20)]
        table = pa.Table.from_batches(batches)
        yield table.filter(pc.equal(table["split"], split)).select(columns)


def training_rows(store: ArtifactStore, tokens: ArtifactRef, posted: bool = False):
    """The training documents of sequences.parquet as tasks.model.Rows: their labels in memory (4 bytes each),
    their ids loaded a row group at a time when training asks for them. posted: also each one's posting_order
    (8 bytes each, for the "latest" validation slice), from the file names in doc_id, read in the same pass."""
    from tasks.model import Rows

    labels, names = [], []
    for table in split_rows(store, tokens, ["label", "doc_id"] if posted else ["label"], "train"):
        labels.append(table["label"].to_numpy().astype(np.int32))
        if posted:  # only the file names are kept, as Arrow strings
            names.append(pc.replace_substring_regex(table["doc_id"].combine_chunks(), r"^.*/", ""))
    starts = np.concatenate([[0], np.cumsum([len(part) for part in labels])])
    path = store.local_file(tokens, "sequences.parquet")

    def load(group: int):
        batches = [batch for _, batch in iter_row_groups(path, SEQUENCES, [group], ["label", "split", "ids"], 1 << 20)]
        table = pa.Table.from_batches(batches)
        train = table.filter(pc.equal(table["split"], "train"))
        return np.arange(starts[group], starts[group + 1]), split_sequences(train), labels[group]

    order = posting_order(pa.chunked_array(names, pa.string())) if posted else None
    return Rows(load, len(labels), np.concatenate(labels) if labels else np.zeros(0, np.int32), order)


def label_names(store: ArtifactStore, tokens: ArtifactRef, n_labels: int) -> list[str]:
    """Group name of each label, read from the corpus the tokens came from; "label <i>" if unreachable."""
    for up in (store.read_manifest(tokens) or {}).get("upstream", []):
        corpus = store.find(up["step"], up["key"]) if up.get("step") == "corpus" else None
        if corpus is None:
            continue
        table = store.read_parquet(corpus, "documents.parquet", DOCUMENTS, columns=["label", "group"])
        pairs = dict(zip(table["label"].to_pylist(), table["group"].to_pylist()))
        return [pairs.get(i, f"label {i}") for i in range(max(n_labels, len(pairs)))]
    return [f"label {i}" for i in range(n_labels)]


# -- step -------------------------------------------------------------------------------------------
STEP = Step("train", version=3)  # 2: sublinear tf-idf bag of words; 3: tasks/model/ package (ExpertProduct, expert_weights)


def write_run(cfg: TrainConfig, store: ArtifactStore, tokens: ArtifactRef, embeddings: ArtifactRef, key: str,
              out: Staging) -> dict:
    """Train and write the run files into `out`; returns the manifest extras."""
    from tasks.model import ModelError, ModelInputError, TrainingInterrupted, fit_classifier  # imports Keras
    from tasks.model import TrainingDiverged as ModelDiverged

    log = step_logger()
    rows = training_rows(store, tokens, posted=getattr(cfg, "validation", "random") == "latest")
    if len(rows) == 0:
        raise InputFormatError(f"{tokens.file('sequences.parquet')}: no rows with split 'train'")
    rules = store.read_json(tokens, "tokenizer.json")
    max_length = int(rules.get("max_length") or 1)
    names = label_names(store, tokens, int(rows.labels.max()) + 1)

    def report(epoch: int, epochs: int, batch: int, batches: int, loss: float | None) -> None:
        reporter.update(batch, batches, phase=f"epoch {epoch}/{epochs}", overall=(epoch - 1 + batch / batches) / epochs,
                        **({"loss": loss} if loss is not None else {}))

    try:
        with Reporter(STEP.name, "batches") as reporter:
            model, history, summary = fit_classifier(
                cfg, rows, None, store.read_npy(embeddings, "matrix.npy"), len(names), max_length,
                CheckpointDir(store.work_dir(STEP.name, key)), log, should_stop=stop_requested, on_batch=report,
            )
    except ModelError as exc:  # tasks.model has its own error types: give the pipeline its own
        kind = {ModelInputError: InputFormatError, ModelDiverged: TrainingDiverged,
                TrainingInterrupted: Interrupted}.get(type(exc), PipelineError)
        raise kind(str(exc)) from exc
    model.save(out.path("model.keras"))
    out.write_parquet("history.parquet", history_table(history), HISTORY)
    plot_curves(history, out.path("curves.png"), title=f"run {key} ({cfg.preset} preset)")
    out.write_json("labels.json", names)
    for name in ("vocab.parquet", "tokenizer.json"):
        out.copy_in(name, store.local_file(tokens, name))
    log.info("run %s: best validation accuracy %.4f at epoch %d of %d (%s on %s)", key, summary["best_val_accuracy"] or 0.0,
             summary["best_epoch"], summary["epochs_run"], summary["backend"], summary["device"])
    return {"rows": len(rows), "training": summary, "backend": summary["backend"], "device": summary["device"],
            "max_length": max_length, "classes": len(names)}


@STEP.task
def train(cfg: TrainConfig, tokens: ArtifactRef, embeddings: ArtifactRef, data_home: str | None = None) -> ArtifactRef:
    key = STEP.key(cfg, [tokens, embeddings])
    result = STEP.run(data_home, cfg, [tokens, embeddings],
                      lambda store, out: write_run(cfg, store, tokens, embeddings, key, out))
    ArtifactStore(data_home).discard_work(STEP.name, key)  # checkpoints are only needed until the run is published
    return result
