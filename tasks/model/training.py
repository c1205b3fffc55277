"""fit_classifier: the resumable training loop, one Keras callback per job.

The callbacks, in the order Keras calls them:
  StopWhenAsked           after every batch: raises TrainingInterrupted once `should_stop()` is true
  reshuffle               keras LambdaCallback: the epoch's length buckets, a function of (seed, epoch)
  EmbeddingWarmup         opens the GloVe gate after `unfreeze_embeddings_after` epochs
  ExpertWeightsFit        fits the expert weights on the validation slice; adds val_* to the epoch's logs
  DivergenceGuard         keras TerminateOnNaN: a NaN/inf loss (or validation loss) raises TrainingDiverged
  ResumableEarlyStopping  keras EarlyStopping on the product's val_loss, carried across a resume
  EpochCheckpoint         the epoch's history row; ckpt-<epoch>/ with the training state and the best weights
  BatchProgress           after every batch: the caller's progress callable (epoch, batch, running loss)
Validation runs in ExpertWeightsFit, not through fit's validation_data: it needs each expert's
probabilities, and the product of experts' log-loss (not the training loss) drives early stopping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras import ops

from tasks.model.batches import Rows, StreamedBatches, length_multiple
from tasks.model.errors import OutOfDeviceMemory, TrainingDiverged, TrainingInterrupted
from tasks.model.expert_product import fit_expert_weights, product_probabilities
from tasks.model.layers import PACKAGE
from tasks.model.model import build_model, check_inputs, compile_model, predict_proba

if TYPE_CHECKING:  # any object with TrainConfig's attributes works (the GPU benchmark runs without pydantic)
    from tasks.config import TrainConfig



def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


def best_row(history: Sequence[dict]) -> dict | None:
    """The history row of the epoch with the lowest validation loss (the first of equals)."""
    return min(history, key=lambda h: h["val_loss"]) if history else None


# -- callbacks --------------------------------------------------------------------------------------------
class StopWhenAsked(keras.callbacks.Callback):
    """Ends training between two batches once `should_stop()` is true (the caller's stop flag: a SIGTERM)."""

    def __init__(self, should_stop: Callable[[], bool], checkpoints):
        super().__init__()
        self.should_stop, self.checkpoints, self.epoch = should_stop, checkpoints, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.should_stop():
            raise TrainingInterrupted(f"training stopped on request in epoch {self.epoch + 1}, batch {batch + 1}; "
                                      f"finished epochs are kept in {self.checkpoints} and the next run resumes from them")


class EmbeddingWarmup(keras.callbacks.Callback):
    """Keeps the GloVe vectors frozen for the first `after` epochs, then trains them (None: frozen throughout)."""

    def __init__(self, after: int | None):
        super().__init__()
        self.after = after

    def on_epoch_begin(self, epoch, logs=None):
        if self.after is not None:
            self.model.get_layer("glove").unfrozen.assign(1.0 if epoch >= self.after else 0.0)


class ExpertWeightsFit(keras.callbacks.Callback):
    """After each epoch: the experts' probabilities on the validation slice fit the product's expert weights.

    Sets them in the classifier and adds to the epoch's logs, for the callbacks after this one:
    val_loss and val_accuracy (of the product of experts), expert_weights, expert_val_accuracy.
    """

    def __init__(self, classifier: keras.Model, rows: Rows, validation: np.ndarray, max_length: int):
        super().__init__()
        self.classifier, self.rows, self.validation, self.max_length = classifier, rows, validation, max_length
        self.labels = rows.labels[validation]

    def on_epoch_end(self, epoch, logs=None):
        parts = [predict_proba(self.model, seqs, self.max_length) for _, seqs in self.rows.select(self.validation)]
        expert_probs = np.concatenate(parts)  # rows in ascending order, as self.labels
        weights, val_loss = fit_expert_weights(expert_probs, self.labels)
        if not np.all(np.isfinite(expert_probs)):
            val_loss = math.nan  # for DivergenceGuard
        elif len(weights) > 1:
            self.classifier.get_layer("expert_product").expert_weights.assign(weights)

        def accuracy(probs):
            return float((probs.argmax(1) == self.labels).mean())

        logs.update(
            val_loss=val_loss,
            val_accuracy=accuracy(product_probabilities(expert_probs, weights)),
            expert_weights=[round(float(w), 3) for w in weights],
            expert_val_accuracy=[round(accuracy(expert_probs[:, e]), 4) for e in range(expert_probs.shape[1])],
        )


class DivergenceGuard(keras.callbacks.TerminateOnNaN):
    """Keras' TerminateOnNaN check after every batch, raising TrainingDiverged with what to do about it;
    and after every epoch, the same for the validation loss (non-finite predictions).

    It runs before EpochCheckpoint, so a diverged epoch leaves no checkpoint and no best weights.
    """

    def __init__(self, learning_rate: float, checkpoints):
        super().__init__(raise_error=True)
        self.learning_rate, self.checkpoints, self.epoch = learning_rate, checkpoints, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError as exc:
            raise TrainingDiverged(
                f"training loss became {float(logs['loss'])} at epoch {self.epoch + 1}, batch {batch + 1}: "
                f"lower learning_rate (now {self.learning_rate}) or check the embedding matrix for NaN/inf; "
                f"the last good checkpoint stays in {self.checkpoints}"
            ) from exc

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not (_finite(logs.get("loss")) and _finite(logs.get("val_loss"))):
            raise TrainingDiverged(f"epoch {epoch + 1} ended with loss {logs.get('loss')} or non-finite predictions; "
                                   f"the last good checkpoint stays in {self.checkpoints}")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping on val_loss, continuing from the finished epochs of a resumed training.

    `patience` as in TrainConfig: the epochs without a lower val_loss that are tolerated (Keras stops at
    its `patience`-th such epoch, hence patience + 1). The best weights are kept on disk by
    EpochCheckpoint, so that they survive a kill (not restore_best_weights, which keeps them in memory).
    """

    def __init__(self, patience: int, history: list[dict], log):
        super().__init__(monitor="val_loss", mode="min", patience=patience + 1)
        self.tolerated, self.history, self.log = patience, history, log

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        best = best_row(self.history)  # rows of the epochs finished before a resume
        if best:
            self.best, self.best_epoch, self.wait = best["val_loss"], best["epoch"] - 1, len(self.history) - best["epoch"]

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.stopped_epoch:
            self.log.info("early stop: no lower validation loss for %d epochs (best epoch %d)", self.tolerated,
                          self.best_epoch + 1)


class EpochCheckpoint(keras.callbacks.Callback):
    """Appends the epoch's history row, then checkpoints the epoch (storage.checkpoints.CheckpointDir or any
    object with its save/restore/best_weights methods): the full training state (weights + optimizer), the
    best classifier weights so far and the progress (history, whether early stopping ended the training),
    so a run killed at any moment resumes from its last complete epoch. Keras' BackupAndRestore does not do
    this: it rewrites one weights file in place and its epoch counter next to it, keeps neither
    history nor best weights, and deletes its backup when fit returns.
    """

    def __init__(self, cfg: TrainConfig, checkpoints, classifier: keras.Model, history: list[dict],
                 early_stopping: ResumableEarlyStopping, log):
        super().__init__()
        self.cfg, self.checkpoints, self.classifier, self.history = cfg, checkpoints, classifier, history
        self.early_stopping, self.log, self.started = early_stopping, log, time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"]),
            "accuracy": float(logs["accuracy"]),  # mean over the experts (each trained on its own)
            "val_loss": logs["val_loss"],  # of the product of experts, as val_accuracy
            "val_accuracy": logs["val_accuracy"],
            "learning_rate": float(ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "seconds": round(time.perf_counter() - self.started, 3),
            "expert_weights": logs["expert_weights"],
            "expert_val_accuracy": logs["expert_val_accuracy"],
        }
        self.history.append(row)
        improved = self.early_stopping.best_epoch == epoch
        self._save(row["epoch"], improved, bool(self.model.stop_training))
        self.log.info(
            "epoch %d/%d: loss %.4f, val_loss %.4f, val_acc %.4f (experts %s, expert weights %s), %.1f s%s",
            row["epoch"], self.cfg.epochs, row["loss"], row["val_loss"], row["val_accuracy"], row["expert_val_accuracy"],
            row["expert_weights"], row["seconds"], " (best)" if improved else "",
        )

    def _save(self, epoch: int, improved: bool, stopped: bool) -> None:
        progress = {"epoch": epoch, "best_epoch": self.early_stopping.best_epoch + 1, "stopped": stopped,
                    "history": self.history}
        best = self.classifier.get_weights() if improved else None
        self.checkpoints.save(epoch, lambda path: self.model.save_weights(path), best, progress)


class BatchProgress(keras.callbacks.Callback):
    """Calls `report(epoch=, epochs=, batch=, batches=, loss=)` (1-based) after every training batch;
    loss is the epoch's running mean, as Keras' own progress bar shows it."""

    def __init__(self, report: Callable[..., None], epochs: int, batches: int):
        super().__init__()
        self.report, self.epochs, self.batches, self.epoch = report, epochs, batches, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        self.report(epoch=self.epoch, epochs=self.epochs, batch=batch + 1, batches=self.batches,
                    loss=None if loss is None else float(loss))


def restore_checkpoint(model: keras.Model, checkpoints, log) -> dict:
    """Load the newest loadable checkpoint into `model`; its progress, {} when there is none."""
    def read_state(path) -> None:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(path)

    return checkpoints.restore(read_state, log)


# -- the loop ---------------------------------------------------------------------------------------------
def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) index arrays; every class keeps at least one training row."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = min(round(len(rows) * fraction), len(rows) - 1)
        val.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def device_info() -> dict:
    """Backend and device Keras trains on (recorded in the run manifest)."""
    backend = keras.config.backend()
    device, name = "cpu", "cpu"
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_logical_devices("GPU")
            if gpus:
                device, name = "gpu", gpus[0].name
        elif backend == "jax":
            import jax

            first = jax.devices()[0]
            device, name = ("gpu" if first.platform in ("gpu", "cuda", "rocm") else first.platform), str(first.device_kind)
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                device, name = "gpu", torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - informational only
        name = f"unknown ({exc})"
    return {"backend": backend, "device": device, "device_name": name, "keras": keras.__version__}


def _is_out_of_memory(exc: BaseException) -> bool:
    """OOM as each backend reports it (TF ResourceExhaustedError, torch OutOfMemoryError, XLA RESOURCE_EXHAUSTED)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    signs = ("out of memory", "resource_exhausted", "resourceexhausted", "oom when")
    return isinstance(exc, MemoryError) or any(s in text for s in signs)


def scan_rows(rows: Rows, fit: np.ndarray, vocab: int) -> tuple[np.ndarray, int, int]:
    """One pass over the documents: (smoothed idf of the `fit` rows, sklearn's formula, padding id 0 gets 0;
    lowest id; highest id)."""
    df = np.zeros(vocab, dtype=np.float64)
    low = top = 0
    for numbers, sequences in rows.select(np.ones(len(rows), dtype=bool)):
        lengths = np.array([len(s) for s in sequences])
        ids = np.concatenate(sequences) if lengths.sum() else np.zeros(0, np.int64)
        if len(ids):
            low, top = min(low, int(ids.min())), max(top, int(ids.max()))
        owner = np.repeat(np.arange(len(sequences)), lengths)
        keep = fit[numbers][owner] & (ids >= 0) & (ids < vocab)
        pairs = np.unique(owner[keep].astype(np.int64) * vocab + ids[keep])  # each (document, id) once
        df += np.bincount(pairs % vocab, minlength=vocab)
    idf = np.log((1 + int(fit.sum())) / (1 + df)) + 1
    idf[0] = 0.0
    return idf.astype(np.float32), low, top


def fit_classifier(
    cfg: TrainConfig,
    sequences: Sequence[np.ndarray] | Rows,
    labels: np.ndarray | None,
    matrix: np.ndarray,
    n_classes: int,
    max_length: int,
    checkpoints,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[..., None] | None = None,
) -> tuple[keras.Model, list[dict], dict]:
    """Train on the documents (a validation slice of them drives early stopping), resuming from `checkpoints`
    (a storage.checkpoints.CheckpointDir: this package touches no files) and stopping once `should_stop()`;
    `on_batch` is called after every batch (BatchProgress). `sequences`: id arrays (with `labels`), or Rows,
    loaded piece by piece: batches are streamed (StreamedBatches), so memory does not grow with the number of
    documents. Returns (classifier with the best validation weights, per-epoch history, summary); raises
    ModelInputError, TrainingDiverged, OutOfDeviceMemory or TrainingInterrupted (tasks.model.errors).
    """
    log = log or logging.getLogger(PACKAGE)
    rows = sequences if isinstance(sequences, Rows) else Rows.in_memory(sequences, labels)
    keras.utils.set_random_seed(cfg.seed)
    fit, validation = (np.isin(np.arange(len(rows)), part)
                       for part in validation_split(rows.labels, cfg.validation_fraction, cfg.seed))
    idf, low, top = scan_rows(rows, fit, len(matrix))
    check_inputs(matrix, (low, top), rows.labels, n_classes)
    training_model, classifier = build_model(cfg, matrix, n_classes, idf)
    experts = training_model.output_shape[1]
    train_data = StreamedBatches(rows, fit, batch_size=cfg.batch_size, max_length=max_length, seed=cfg.seed,
                                 multiple=length_multiple(), targets=experts)
    compile_model(training_model, cfg, len(train_data))
    progress = restore_checkpoint(training_model, checkpoints, log)
    history, initial_epoch = list(progress.get("history", [])), progress.get("epoch", 0)
    if progress:
        log.info("resuming from %s: %d of %d epochs done", progress["name"], initial_epoch, cfg.epochs)
    info = device_info()
    log.info("training on %s (%s, keras %s backend): %d train / %d validation documents, %d batches per epoch, %d experts",
             info["device_name"], info["device"], info["backend"], fit.sum(), validation.sum(), len(train_data), experts)

    early_stopping = ResumableEarlyStopping(cfg.patience, history, log)
    callbacks = [
        StopWhenAsked(should_stop, checkpoints),
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: train_data.set_epoch(epoch)),
        EmbeddingWarmup(cfg.unfreeze_embeddings_after),
        ExpertWeightsFit(classifier, rows, validation, max_length),
        DivergenceGuard(cfg.learning_rate, checkpoints),
        early_stopping,
        EpochCheckpoint(cfg, checkpoints, classifier, history, early_stopping, log),
    ] + ([BatchProgress(on_batch, cfg.epochs, len(train_data))] if on_batch else [])
    started = time.perf_counter()
    if initial_epoch < cfg.epochs and not progress.get("stopped"):
        _fit(training_model, train_data, cfg, initial_epoch, callbacks, info, checkpoints)
    if (best := checkpoints.best_weights()) is not None:
        classifier.set_weights(best)
    return classifier, history, {
        **info, **_history_summary(history), "stopped_early": bool(early_stopping.stopped_epoch or progress.get("stopped")),
        "resumed_from_epoch": initial_epoch, "train_documents": int(fit.sum()), "validation_documents": int(validation.sum()),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _fit(model: keras.Model, data: StreamedBatches, cfg: TrainConfig, initial_epoch: int, callbacks: list, info: dict,
         checkpoints) -> None:
    """model.fit, with out-of-memory (however the backend reports it) as OutOfDeviceMemory naming what to lower."""
    try:
        # shuffle=False: the batches shuffle themselves, and are streamed in order
        model.fit(data, epochs=cfg.epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0, shuffle=False)
    except Exception as exc:  # only out-of-memory is translated, the rest re-raised
        if not _is_out_of_memory(exc):
            raise
        raise OutOfDeviceMemory(
            f"{info['device']} out of memory training with batch_size={cfg.batch_size} on {info['device_name']} "
            f"({type(exc).__name__}); lower train.batch_size or train.lstm_max_tokens. "
            f"Finished epochs are kept in {checkpoints} and the next run resumes from them"
        ) from exc


def _history_summary(history: list[dict]) -> dict:
    best = best_row(history)
    return {
        "epochs_run": len(history),
        "best_epoch": best["epoch"] if best else 0,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "expert_weights": best["expert_weights"] if best else None,
        "seconds_per_epoch": [h["seconds"] for h in history],
    }
