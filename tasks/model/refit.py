"""refit_on_all: after the settings and the epoch are chosen on the validation slice, train once more on every document.

The validation slice is the latest posts of each group (TrainConfig.validation = "latest"): the posts nearest
in time to a later test split are exactly the ones the first training leaves out. The refit trains a fresh
model on all the training documents, validation slice included, for the best epoch's number of epochs with
the same schedule, and gives its product the expert weights fitted on the validation slice at that epoch.
With `refit_members` > 1 it trains that many such models, each with its own seed, and averages their experts
(tasks.model.model.member_mean): on the validation slice, refit-off models averaged beat one of them on most
configurations tried, the LSTM expert most (benchmarks/results/bench_members.json). Each member is resumable
like the first training (its own checkpoints: `checkpoints.sub("refit")` for the first, "refit-2", ... for the others).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from tasks.model.batches import Rows, length_multiple
from tasks.model.callbacks import BatchProgress, DivergenceGuard, EmbeddingWarmup, StopWhenAsked, restore_checkpoint
from tasks.model.device_batches import training_batches
from tasks.model.model import build_model, compile_model, member_mean
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


def member_seed(seed: int, member: int) -> int:
    """The seed of refit member `member` (0-based): the run's own seed for the first, so one member is the plain refit;
    the others derived from (seed, member), so they collide with no other run's seed in a sweep of seeds 1, 2, 3..."""
    return seed if member == 0 else int(np.random.SeedSequence([seed, member]).generate_state(1)[0] >> 1)


def refit_on_all(cfg, rows: Rows, matrix: np.ndarray, n_classes: int, max_length: int, checkpoints, best: dict, info: dict,
                 log, should_stop=lambda: False, on_batch=None) -> tuple[keras.Model, dict]:
    """(classifier trained on every document of `rows` for best["epoch"] epochs, with best["expert_weights"]: one model
    or the average of cfg.refit_members; summary). Streamed like the first training, stoppable, reporting its batches;
    each member checkpoints into its own subdirectory of `checkpoints` (the first training's)."""
    started, count = time.perf_counter(), getattr(cfg, "refit_members", 1)
    members, resumed, idf = [], [], scan_rows(rows, np.ones(len(rows), dtype=bool), len(matrix))[0]
    for member in range(count):
        sub = checkpoints.sub("refit" if member == 0 else f"refit-{member + 1}")
        classifier, done = _refit_member(cfg, member_seed(cfg.seed, member), rows, idf, matrix, n_classes, max_length, sub,
                                         best["epoch"], info, log, should_stop, on_batch, f" {member + 1}/{count}" * (count > 1))
        members.append(classifier)
        resumed.append(done)
    weights = best["expert_weights"] if len(best["expert_weights"]) > 1 else [1.0]
    if count > 1:
        classifier = member_mean(members, weights)
    elif len(weights) > 1:
        classifier.get_layer("expert_product").expert_weights.assign(np.asarray(weights, dtype="float32"))
    return classifier, {"epochs": best["epoch"], "documents": len(rows), "members": count,
                        "resumed_from_epoch": min(resumed), "seconds": round(time.perf_counter() - started, 3)}


def _refit_member(cfg, seed: int, rows: Rows, idf: np.ndarray, matrix: np.ndarray, n_classes: int, max_length: int,
                  checkpoints, epochs: int, info: dict, log, should_stop, on_batch, label: str) -> tuple[keras.Model, int]:
    """(classifier of one model trained on every document for `epochs` epochs with `seed`, epoch it resumed after)."""
    keras.utils.set_random_seed(seed)
    training_model, classifier = build_model(cfg, matrix, n_classes, idf)
    data = training_batches(rows, np.ones(len(rows), dtype=bool), batch_size=cfg.batch_size, max_length=max_length,
                            seed=seed, multiple=length_multiple(), targets=training_model.output_shape[1])
    compile_model(training_model, cfg, len(data))
    done = restore_checkpoint(training_model, checkpoints, log).get("epoch", 0)
    log.info("refit%s: %d epochs on all %d training documents%s", label, epochs, len(rows),
             f", resuming after epoch {done}" if done else "")
    if done < epochs:
        callbacks = [StopWhenAsked(should_stop, checkpoints),
                     keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: data.set_epoch(epoch)),
                     EmbeddingWarmup(cfg.unfreeze_embeddings_after), DivergenceGuard(cfg.learning_rate, checkpoints),
                     RefitCheckpoint(checkpoints, log)] + ([BatchProgress(on_batch, epochs, len(data))] if on_batch else [])
        fit_epochs(training_model, data, cfg, done, epochs, callbacks, info, checkpoints)
    return classifier, done
