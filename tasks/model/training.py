"""fit_classifier: the resumable training loop, one Keras callback per job.

The callbacks (tasks/model/callbacks.py), in the order Keras calls them:
  StopWhenAsked           after every batch: raises TrainingInterrupted once `should_stop()` is true
  reshuffle               keras LambdaCallback: the epoch's length buckets, a function of (seed, epoch)
  EmbeddingWarmup         opens the GloVe gate after `unfreeze_embeddings_after` epochs
  ExpertWeightsFit        fits the expert weights on the validation slice; adds val_* to the epoch's logs
  DivergenceGuard         a NaN/inf loss or validation loss of the epoch raises TrainingDiverged
  ResumableEarlyStopping  keras EarlyStopping on the product's val_loss, carried across a resume
  EpochCheckpoint         the epoch's history row; ckpt-<epoch>/ with the training state and the best weights
  BatchProgress           after every batch: the caller's progress callable (epoch, batch, running loss)
Validation runs in ExpertWeightsFit, not through fit's validation_data: it needs each expert's
probabilities, and the product of experts' log-loss (not the training loss) drives early stopping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np

from tasks.model.batches import Rows, StreamedBatches, length_multiple
from tasks.model.callbacks import (  # noqa: F401 - callbacks re-exported: tests and refit reach them here
    BatchProgress,
    DivergenceGuard,
    EmbeddingWarmup,
    EpochCheckpoint,
    ExpertWeightsFit,
    ResumableEarlyStopping,
    StopWhenAsked,
    best_row,
    restore_checkpoint,
)
from tasks.model.device_batches import DeviceBatches, training_batches, validation_batches
from tasks.model.errors import OutOfDeviceMemory, TrainingDiverged  # noqa: F401 - re-exported
from tasks.model.layers import PACKAGE
from tasks.model.model import build_model, check_inputs, compile_model, expert_names

if TYPE_CHECKING:  # any object with TrainConfig's attributes works (the GPU benchmark runs without pydantic)
    from tasks.config import TrainConfig



# -- the loop ---------------------------------------------------------------------------------------------
def validation_split(labels: np.ndarray, fraction: float, seed: int, mode: str = "random",
                     order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) index arrays; every class keeps at least one training row.

    mode "random": a seeded random `fraction` of each class. mode "latest": each class's latest
    documents, the highest `order` values (ties: the later row), or its last rows when `order` is None.
    A test split made of later posts (20news-bydate) is better mimicked by the latest training posts
    than by a random slice, which shares threads and authors with the rows it validates.
    """
    rng = np.random.default_rng(seed)
    keys = np.arange(len(labels)) if order is None else np.asarray(order)
    train, val = [], []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rng.permutation(rows) if mode == "random" else rows[np.lexsort((rows, keys[rows]))[::-1]]
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


def fit_classifier(cfg: TrainConfig, sequences: Sequence[np.ndarray] | Rows, labels: np.ndarray | None, matrix: np.ndarray,
                   n_classes: int, max_length: int, checkpoints, log: logging.Logger | logging.LoggerAdapter | None = None,
                   should_stop: Callable[[], bool] = lambda: False, on_batch: Callable[..., None] | None = None,
                   order: np.ndarray | None = None) -> tuple[keras.Model, list[dict], dict]:
    """Train on the documents (a validation slice of them drives early stopping), resuming from `checkpoints`
    (a storage.checkpoints.CheckpointDir: this package touches no files) and stopping once `should_stop()`;
    `on_batch` is called after every batch (BatchProgress). `sequences`: id arrays (with `labels`, and `order`:
    when each was posted, any increasing key, for cfg.validation "latest"), or Rows (with their own `posted`),
    loaded piece by piece: batches are streamed (StreamedBatches; on the device where they fit, DeviceBatches),
    so host memory does not grow with the number of documents. With cfg.refit, a second training on every
    document for the best epoch count, of cfg.refit_members models averaged (tasks.model.refit). Returns (classifier
    with the best validation weights, or the refit's; per-epoch history; summary); raises ModelInputError,
    TrainingDiverged, OutOfDeviceMemory or TrainingInterrupted (tasks.model.errors).
    """
    log = log or logging.getLogger(PACKAGE)
    rows = sequences if isinstance(sequences, Rows) else Rows.in_memory(sequences, labels, posted=order)
    keras.utils.set_random_seed(cfg.seed)
    mode = getattr(cfg, "validation", "random")
    fit, validation, idf = _slices(cfg, rows, mode, matrix, n_classes)
    training_model, classifier = build_model(cfg, matrix, n_classes, idf)
    experts = training_model.output_shape[1]
    train_data = training_batches(rows, fit, batch_size=cfg.batch_size, max_length=max_length, seed=cfg.seed,
                                  multiple=length_multiple(), targets=experts)
    compile_model(training_model, cfg, len(train_data))
    progress = restore_checkpoint(training_model, checkpoints, log)
    history, initial_epoch = list(progress.get("history", [])), progress.get("epoch", 0)
    if progress:
        log.info("resuming from %s: %d of %d epochs done", progress["name"], initial_epoch, cfg.epochs)
    info = device_info()
    log.info("training on %s (%s, keras %s backend): %d train / %d validation documents (%s), %d batches per epoch, "
             "%d experts%s", info["device_name"], info["device"], info["backend"], fit.sum(), validation.sum(), mode,
             len(train_data), experts, ", batches on the device" if isinstance(train_data, DeviceBatches) else "")

    early_stopping = ResumableEarlyStopping(cfg.patience, history, log)
    callbacks = [
        StopWhenAsked(should_stop, checkpoints),
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: train_data.set_epoch(epoch)),
        EmbeddingWarmup(cfg.unfreeze_embeddings_after),
        ExpertWeightsFit(classifier, rows, validation, max_length, validation_batches(rows, validation, max_length)),
        DivergenceGuard(cfg.learning_rate, checkpoints),
        early_stopping,
        EpochCheckpoint(cfg, checkpoints, classifier, history, early_stopping, log),
    ] + ([BatchProgress(on_batch, cfg.epochs, len(train_data))] if on_batch else [])
    started = time.perf_counter()
    if initial_epoch < cfg.epochs and not progress.get("stopped"):
        fit_epochs(training_model, train_data, cfg, initial_epoch, cfg.epochs, callbacks, info, checkpoints)
    if (best := checkpoints.best_weights()) is not None:
        classifier.set_weights(best)
    stopped = bool(early_stopping.stopped_epoch or progress.get("stopped"))
    summary = {**info, **_history_summary(history), "stopped_early": stopped, "resumed_from_epoch": initial_epoch,
               "train_documents": int(fit.sum()), "validation": mode,
               "validation_documents": int(validation.sum()), "experts": expert_names(cfg),
               "seconds": round(time.perf_counter() - started, 3)}
    if getattr(cfg, "refit", False) and history:  # the settings and epoch are chosen: now train on everything
        from tasks.model.refit import refit_on_all

        classifier, summary["refit"] = refit_on_all(cfg, rows, matrix, n_classes, max_length, checkpoints,
                                                    best_row(history), info, log, should_stop, on_batch)
    return classifier, history, summary


def _slices(cfg: TrainConfig, rows: Rows, mode: str, matrix: np.ndarray, n_classes: int):
    """(training rows, validation rows) as masks, and the idf of the training rows, once the inputs are checked."""
    fit, validation = (np.isin(np.arange(len(rows)), part)
                       for part in validation_split(rows.labels, cfg.validation_fraction, cfg.seed, mode, rows.posted))
    idf, low, top = scan_rows(rows, fit, len(matrix))
    check_inputs(matrix, (low, top), rows.labels, n_classes)
    return fit, validation, idf


def fit_epochs(model: keras.Model, data: StreamedBatches | DeviceBatches, cfg: TrainConfig, initial_epoch: int, epochs: int,
               callbacks: list, info: dict, checkpoints) -> None:
    """model.fit, with out-of-memory (however the backend reports it) as OutOfDeviceMemory naming what to lower."""
    try:
        # shuffle=False: the batches shuffle themselves (a function of (seed, epoch)), and are streamed in order
        model.fit(data, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0, shuffle=False)
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
