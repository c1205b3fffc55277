"""refit_on_all: after the settings and the epoch are chosen on the validation slice, train once more on every document.

The validation slice is the latest posts of each group (TrainConfig.validation = "latest"): the posts nearest
in time to a later test split are exactly the ones the first training leaves out. The refit trains a fresh
model on all the training documents, validation slice included, for the best epoch's number of epochs with
the same schedule, and gives its product the expert weights fitted on the validation slice at that epoch.
It is resumable like the first training (its own checkpoints, `checkpoints.sub("refit")`).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from tasks.model.batches import Rows, length_multiple
from tasks.model.callbacks import BatchProgress, DivergenceGuard, EmbeddingWarmup, StopWhenAsked, restore_checkpoint
from tasks.model.device_batches import training_batches
from tasks.model.model import build_model, compile_model
from tasks.model.training import fit_epochs, scan_rows


class RefitCheckpoint(keras.callbacks.Callback):
    """Each finished refit epoch: the training state and its number (no best weights: the last epoch is the model)."""

    def __init__(self, checkpoints, log):
        super().__init__()
        self.checkpoints, self.log, self.started = checkpoints, log, time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.checkpoints.save(epoch + 1, lambda path: self.model.save_weights(path), None, {"epoch": epoch + 1})
        self.log.info("refit epoch %d/%d: loss %.4f, %.1f s", epoch + 1, self.params["epochs"], float(logs["loss"]),
                      time.perf_counter() - self.started)


def refit_on_all(cfg, rows: Rows, matrix: np.ndarray, n_classes: int, max_length: int, checkpoints, best: dict, info: dict,
                 log, should_stop=lambda: False, on_batch=None) -> tuple[keras.Model, dict]:
    """(classifier trained on every document of `rows` for best["epoch"] epochs, with best["expert_weights"]; summary).
    Streamed like the first training (tasks.model.training.training_batches), stoppable and reporting its batches."""
    keras.utils.set_random_seed(cfg.seed)
    everything = np.ones(len(rows), dtype=bool)
    training_model, classifier = build_model(cfg, matrix, n_classes, scan_rows(rows, everything, len(matrix))[0])
    data = training_batches(rows, everything, batch_size=cfg.batch_size, max_length=max_length, seed=cfg.seed,
                            multiple=length_multiple(), targets=training_model.output_shape[1])
    compile_model(training_model, cfg, len(data))
    done, epochs = restore_checkpoint(training_model, checkpoints, log).get("epoch", 0), best["epoch"]
    log.info("refit: %d epochs on all %d training documents%s", epochs, len(rows),
             f", resuming after epoch {done}" if done else "")
    started = time.perf_counter()
    if done < epochs:
        callbacks = [StopWhenAsked(should_stop, checkpoints),
                     keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: data.set_epoch(epoch)),
                     EmbeddingWarmup(cfg.unfreeze_embeddings_after), DivergenceGuard(cfg.learning_rate, checkpoints),
                     RefitCheckpoint(checkpoints, log)] + ([BatchProgress(on_batch, epochs, len(data))] if on_batch else [])
        fit_epochs(training_model, data, cfg, done, epochs, callbacks, info, checkpoints)
    if len(best["expert_weights"]) > 1:
        classifier.get_layer("expert_product").expert_weights.assign(np.asarray(best["expert_weights"], dtype="float32"))
    return classifier, {"epochs": epochs, "documents": len(rows), "resumed_from_epoch": done,
                        "seconds": round(time.perf_counter() - started, 3)}
