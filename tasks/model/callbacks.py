"""The callbacks of fit_classifier (tasks.model.training), one job each; the order Keras calls them is listed there.

None of them makes a training step wait for the device: the batch-end hooks (StopWhenAsked, BatchProgress) are
`async_safe`, so torch and jax run them off the training loop (TensorFlow's Keras calls them in line anyway), and
the divergence check runs once per epoch, like the validation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras import ops

from tasks.model.batches import Rows
from tasks.model.errors import TrainingDiverged, TrainingInterrupted
from tasks.model.expert_product import fit_expert_weights, product_probabilities
from tasks.model.model import predict_batches, predict_proba

if TYPE_CHECKING:
    from tasks.config import TrainConfig


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


def best_row(history: Sequence[dict]) -> dict | None:
    """The history row of the epoch with the lowest validation loss (the first of equals)."""
    return min(history, key=lambda h: h["val_loss"]) if history else None


# -- callbacks --------------------------------------------------------------------------------------------
class StopWhenAsked(keras.callbacks.Callback):
    """Ends training between two batches once `should_stop()` is true (the caller's stop flag: a SIGTERM).
    Run off the training loop where the backend allows (async_safe): its error then surfaces a batch later."""

    async_safe = True  # reads a flag, touches neither the model nor the logs

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
    `batches`: the slice's batches built once (tasks.model.device_batches, where they fit on the device);
    None: the slice is streamed from `rows` every epoch.
    """

    def __init__(self, classifier: keras.Model, rows: Rows, validation: np.ndarray, max_length: int, batches=None):
        super().__init__()
        self.classifier, self.rows, self.validation, self.max_length = classifier, rows, validation, max_length
        self.labels, self.batches = rows.labels[validation], batches

    def on_epoch_end(self, epoch, logs=None):
        if self.batches is not None:  # the slice's batches, built once
            expert_probs = predict_batches(self.model, self.batches)
        else:  # streamed, a window of pieces at a time: rows in ascending order, as self.labels
            expert_probs = np.concatenate([predict_proba(self.model, seqs, self.max_length)
                                           for seqs in self.rows.windows(self.validation)])
        if not np.all(np.isfinite(expert_probs)):  # diverged: DivergenceGuard stops the training
            logs.update(val_loss=math.nan, val_accuracy=math.nan, expert_weights=[], expert_val_accuracy=[])
            return
        weights, val_loss = fit_expert_weights(expert_probs, self.labels)
        if len(weights) > 1:
            self.classifier.get_layer("expert_product").expert_weights.assign(weights)

        def accuracy(probs):
            return float((probs.argmax(1) == self.labels).mean())

        logs.update(
            val_loss=val_loss,
            val_accuracy=accuracy(product_probabilities(expert_probs, weights)),
            expert_weights=[round(float(w), 3) for w in weights],
            expert_val_accuracy=[round(accuracy(expert_probs[:, e]), 4) for e in range(expert_probs.shape[1])],
        )


class DivergenceGuard(keras.callbacks.Callback):
    """After every epoch: a NaN/inf training loss (the epoch's mean: one bad batch makes it NaN) or validation
    loss (non-finite predictions) raises TrainingDiverged with what to do about it.

    Only per epoch, like the validation: a per-batch check (keras' TerminateOnNaN) would make every step wait
    for the device to hand its loss to the host. It runs before EpochCheckpoint, so a diverged epoch leaves no
    checkpoint and no best weights.
    """

    def __init__(self, learning_rate: float, checkpoints):
        super().__init__()
        self.learning_rate, self.checkpoints = learning_rate, checkpoints

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not (_finite(logs.get("loss")) and _finite(logs.get("val_loss"))):
            raise TrainingDiverged(
                f"epoch {epoch + 1} ended with training loss {logs.get('loss')}, validation loss {logs.get('val_loss')}: "
                f"lower learning_rate (now {self.learning_rate}) or check the embedding matrix for NaN/inf; "
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
    loss is the epoch's running mean, as Keras' own progress bar shows it. Run off the training loop where
    the backend allows (async_safe), so reading the loss does not make the next step wait for this one."""

    async_safe = True

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
