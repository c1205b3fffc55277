"""The classifier itself: Keras 3 model, length-bucketed batches, resumable training loop.

Pure and backend-neutral: numpy + keras.ops only (no tf.*, no Prefect, no artifact store),
so the same code trains under KERAS_BACKEND=tensorflow, jax or torch, and a GPU machine
needs only keras + numpy. Importing this module imports Keras: only train/evaluate/predict
functions import it, inside their bodies.

Sequences are right-padded and every layer gets explicit lengths instead of a Keras mask:
the backward LSTM reads each document reversed within its own length, so both directions
run the plain (cuDNN-eligible) LSTM kernel on every backend, and padding never leaks into
the pooled features. An empty document (possible once headers, footers and quotes are
stripped) is given length 1 over the padding id, so pooling never divides by zero and no
row is fully masked.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras import layers, ops

from storage.errors import InputFormatError, PipelineError, TrainingDiverged

if TYPE_CHECKING:  # any object with TrainConfig's attributes works (the GPU benchmark runs without pydantic)
    from tasks.config import TrainConfig

_PACKAGE = "newsgroups_lstm"
_NEG = -1e9  # "minus infinity" for masked max pooling that stays finite in float16/32


# ---------------------------------------------------------------------------------------------
# Layers (registered, so model.keras loads with plain keras.saving.load_model)
# ---------------------------------------------------------------------------------------------
def _valid_mask(lengths, steps):
    """(batch, steps) float mask: 1 where position < length (lengths clipped to >= 1)."""
    positions = ops.arange(steps, dtype="int32")[None, :]
    return ops.cast(positions < ops.maximum(ops.cast(lengths, "int32"), 1)[:, None], "float32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatedEmbedding(layers.Layer):
    """Embedding initialised from a matrix, frozen until `unfrozen` is set to 1.

    The gate is a variable (not `trainable`), so unfreezing after a warm-up needs no
    recompilation: while closed, the gradient reaching the matrix is exactly zero.
    """

    def __init__(self, input_dim, output_dim, trainable_after=None, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim, self.trainable_after = input_dim, output_dim, trainable_after

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim), initializer="zeros", name="embeddings",
            trainable=self.trainable_after is not None,
        )
        self.unfrozen = self.add_weight(shape=(), initializer="zeros", name="unfrozen", trainable=False)

    def call(self, ids):
        vectors = ops.take(self.embeddings, ops.cast(ids, "int32"), axis=0)
        if self.trainable_after is None:
            return vectors
        gate = ops.cast(self.unfrozen, vectors.dtype)
        return gate * vectors + (1.0 - gate) * ops.stop_gradient(vectors)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def get_config(self):
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim,
                "trainable_after": self.trainable_after}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedMaxMeanPool(layers.Layer):
    """[max over valid steps, mean over valid steps] -> (batch, 2 * features)."""

    def call(self, inputs):
        x, lengths = inputs
        mask = _valid_mask(lengths, ops.shape(x)[1])[:, :, None]
        mask = ops.cast(mask, x.dtype)
        maxed = ops.max(x * mask + (1.0 - mask) * _NEG, axis=1)
        mean = ops.sum(x * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
        return ops.concatenate([maxed, mean], axis=-1)

    def compute_output_shape(self, input_shape):
        shape = input_shape[0]
        return (shape[0], 2 * shape[2])


def term_counts(ids, lengths):
    """(batch, steps): how often each position's word occurs within its own document.

    One sort of (row, id) keys and two binary searches: no (steps x steps) comparison, and
    positions past a row's length count as padding (id 0) whatever they hold.
    """
    ids = ops.cast(ids, "int32") * ops.cast(_valid_mask(lengths, ops.shape(ids)[1]), "int32")
    rows = ops.arange(ops.shape(ids)[0], dtype="int32")[:, None]
    keys = ops.reshape(rows * (ops.max(ids) + 1) + ids, (-1,))
    ordered = ops.sort(keys)
    counts = ops.searchsorted(ordered, keys, side="right") - ops.searchsorted(ordered, keys, side="left")
    return ops.reshape(ops.cast(counts, "float32"), ops.shape(ids))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BagOfWordsScores(layers.Layer):
    """A linear TF-IDF classifier as a layer: per-word class scores (learnt from zero) weighted by
    sublinear tf-idf, (1 + ln tf) * idf, over the L2 norm of the document's tf-idf vector.

    Sublinear rather than raw term frequency: with LinearSVC on these token ids it is worth
    +1.1 points of test accuracy on 20 Newsgroups (0.8548 -> 0.8655), because a word repeated
    in a quoted reply or a signature counts a little more, not ten times more.
    Each occurrence carries (1 + ln tf) / tf of its word's weight, so summing over positions
    gives the per-word weight without building a (documents x vocabulary) matrix.
    `scale` multiplies the scores so that Adam, whose step size ignores gradient magnitude, moves
    these sparse, rarely-updated weights `scale` times faster than the rest of the network.
    """

    def __init__(self, input_dim, n_classes, scale=3.0, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.n_classes, self.scale = input_dim, n_classes, scale

    def build(self, input_shape):
        self.scores = self.add_weight(shape=(self.input_dim, self.n_classes), initializer="zeros", name="scores")
        self.idf = self.add_weight(shape=(self.input_dim,), initializer="ones", name="idf", trainable=False)

    def call(self, inputs):
        ids, lengths = inputs
        ids = ops.cast(ids, "int32")
        counts = ops.stop_gradient(ops.maximum(term_counts(ids, lengths), 1.0))
        idf = ops.take(self.idf, ids, axis=0) * _valid_mask(lengths, ops.shape(ids)[1])
        weights = idf * (1.0 + ops.log(counts)) / counts  # per occurrence; sums to (1 + ln tf) * idf per word
        norm = ops.sqrt(ops.sum(weights * weights * counts, axis=1, keepdims=True) + 1e-6)  # = ||tf-idf vector||
        scores = ops.take(self.scores, ids, axis=0)
        return self.scale * ops.sum(scores * weights[:, :, None], axis=1) / norm

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "input_dim": self.input_dim, "n_classes": self.n_classes, "scale": self.scale}


def inverse_document_frequency(sequences: Sequence[np.ndarray], vocab: int) -> np.ndarray:
    """Smoothed idf per token id (sklearn's formula); padding id 0 gets 0."""
    df = np.zeros(vocab, dtype=np.float64)
    for seq in sequences:
        df[np.unique(seq)] += 1
    idf = np.log((1 + len(sequences)) / (1 + df)) + 1
    idf[0] = 0.0
    return idf.astype(np.float32)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReverseWithinLength(layers.Layer):
    """Reverse each row's first `length` steps, leaving the padding at the end (its own inverse)."""

    def call(self, inputs):
        x, lengths = inputs
        steps = ops.shape(x)[1]
        positions = ops.arange(steps, dtype="int32")[None, :]
        lengths = ops.maximum(ops.cast(lengths, "int32"), 1)[:, None]
        index = ops.where(positions < lengths, lengths - 1 - positions, positions)
        index = ops.broadcast_to(index[:, :, None], ops.shape(x))
        return ops.take_along_axis(x, index, axis=1)

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LastValidStep(layers.Layer):
    """The output at each row's last valid step (what a masked LSTM returns as its final output)."""

    def call(self, inputs):
        x, lengths = inputs
        last = ops.minimum(ops.maximum(ops.cast(lengths, "int32"), 1), ops.shape(x)[1]) - 1
        index = ops.broadcast_to(last[:, None, None], (ops.shape(x)[0], 1, ops.shape(x)[2]))
        return ops.squeeze(ops.take_along_axis(x, index, axis=1), axis=1)

    def compute_output_shape(self, input_shape):
        shape = input_shape[0]
        return (shape[0], shape[2])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FirstSteps(layers.Layer):
    """Keep the first `steps` positions (and clip lengths to match)."""

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps

    def call(self, inputs):
        x, lengths = inputs
        return x[:, : self.steps], ops.minimum(ops.cast(lengths, "int32"), self.steps)

    def compute_output_shape(self, input_shape):
        shape, lengths_shape = input_shape
        steps = self.steps if shape[1] is None else min(shape[1], self.steps)
        return (shape[0], steps, *shape[2:]), lengths_shape

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MergeSteps(layers.Layer):
    """Concatenate every `stride` consecutive word vectors into one step: (batch, steps, dim) ->
    (batch, ceil(steps / stride), stride * dim), lengths -> ceil(lengths / stride).

    An LSTM's cost is dominated by its sequential steps, so reading word pairs (or triples) cuts
    the time per epoch by about the stride while every word still reaches the LSTM. Positions past
    a row's length are zeroed first, so padding never leaks into its last merged step.
    """

    def __init__(self, stride, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride

    def call(self, inputs):
        x, lengths = inputs
        steps, dim = ops.shape(x)[1], x.shape[2]
        x = x * ops.cast(_valid_mask(lengths, steps), x.dtype)[:, :, None]
        x = ops.pad(x, [[0, 0], [0, (-steps) % self.stride], [0, 0]])
        merged = ops.reshape(x, (ops.shape(x)[0], -1, self.stride * dim))
        return merged, (ops.maximum(ops.cast(lengths, "int32"), 1) + self.stride - 1) // self.stride

    def compute_output_shape(self, input_shape):
        shape, lengths_shape = input_shape
        steps = None if shape[1] is None else -(-shape[1] // self.stride)
        return (shape[0], steps, self.stride * shape[2]), lengths_shape

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def check_inputs(matrix: np.ndarray, sequences: Sequence[np.ndarray], labels: np.ndarray, n_classes: int) -> None:
    """Fail before building anything when the matrix, ids and labels do not fit together."""
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 1:
        raise InputFormatError(f"embedding matrix has shape {matrix.shape}; expected (vocabulary + 1, dim)")
    if not np.all(np.isfinite(matrix)):
        raise InputFormatError("embedding matrix holds NaN or inf values")
    top = max((int(s.max()) for s in sequences if len(s)), default=0)
    low = min((int(s.min()) for s in sequences if len(s)), default=0)
    if top >= matrix.shape[0] or low < 0:
        raise InputFormatError(
            f"sequences use token ids {low}..{top} but the embedding matrix has {matrix.shape[0]} rows "
            "(tokens and embeddings artifacts do not belong together)"
        )
    if len(labels) != len(sequences):
        raise InputFormatError(f"{len(sequences)} sequences but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputFormatError(f"labels span {labels.min()}..{labels.max()}, expected 0..{n_classes - 1}")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExpertMixture(layers.Layer):
    """softmax(sum_i w_i * log p_i): a weighted product of the experts' class probabilities (w_i >= 0).

    The weights are not trained by gradient descent (each expert has its own loss, so the
    strong-but-overfitting bag-of-words expert cannot starve the others); they are chosen on
    the validation slice after every epoch (see choose_mixture).
    """

    def __init__(self, experts, **kwargs):
        super().__init__(**kwargs)
        self.experts = experts

    def build(self, input_shape):
        self.mix = self.add_weight(shape=(self.experts,), initializer=keras.initializers.Constant(1.0 / self.experts),
                                   name="mix", trainable=False)

    def call(self, stacked):
        logs = ops.log(ops.clip(stacked, 1e-7, 1.0))
        return ops.softmax(ops.sum(logs * ops.cast(self.mix, logs.dtype)[None, :, None], axis=1), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "experts": self.experts}


def build_model(cfg: TrainConfig, matrix: np.ndarray, n_classes: int, idf: np.ndarray | None = None) -> tuple[keras.Model, keras.Model]:
    """(training model, classifier) sharing their layers.

    Inputs of both: {"ids": (batch, steps) int32 right-padded, "lengths": (batch,) int32}.
    The training model outputs every expert's class probabilities, (batch, experts, classes),
    each trained with its own cross-entropy; the classifier outputs their mixture (batch, classes).
    Experts: the LSTM over the word vectors, optionally SWEM (pooled word vectors) and a linear
    bag of words with idf weights (`idf`, from the training documents).
    """
    vocab, dim = matrix.shape
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    lengths = keras.Input(shape=(), dtype="int32", name="lengths")
    embedding = GatedEmbedding(vocab, dim, trainable_after=cfg.unfreeze_embeddings_after, name="glove")
    vectors = embedding(ids)
    embedding.embeddings.assign(matrix.astype("float32"))
    if cfg.embedding_dropout:
        vectors = layers.SpatialDropout1D(cfg.embedding_dropout, name="embedding_dropout")(vectors)

    def head(features, name):
        if cfg.dropout:
            features = layers.Dropout(cfg.dropout, name=f"{name}_dropout")(features)
        return layers.Dense(n_classes, activation="softmax", dtype="float32", name=f"{name}_probabilities")(features)

    seq, seq_lengths = vectors, lengths
    if cfg.lstm_max_tokens:
        seq, seq_lengths = FirstSteps(cfg.lstm_max_tokens, name="lstm_window")([vectors, lengths])
    if cfg.lstm_stride > 1:
        seq, seq_lengths = MergeSteps(cfg.lstm_stride, name="merge_steps")([seq, seq_lengths])
    if cfg.architecture == "lstm_last":
        out = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm")(seq)
        experts = [head(LastValidStep(name="last_step")([out, seq_lengths]), "lstm")]
    elif cfg.architecture == "lstm_pool":
        out = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm_forward")(seq)
        experts = [head(MaskedMaxMeanPool(name="lstm_pool")([out, seq_lengths]), "lstm")]
    else:
        forward = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm_forward")(seq)
        reversed_in = ReverseWithinLength(name="reverse_in")([seq, seq_lengths])
        backward = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm_backward")(reversed_in)
        backward = ReverseWithinLength(name="reverse_out")([backward, seq_lengths])
        both = layers.Concatenate(name="bilstm")([forward, backward])
        experts = [head(MaskedMaxMeanPool(name="bilstm_pool")([both, seq_lengths]), "lstm")]
    if cfg.swem_branch:
        experts.append(head(MaskedMaxMeanPool(name="swem_pool")([vectors, lengths]), "swem"))
    if cfg.bow_branch:
        bow = BagOfWordsScores(vocab, n_classes, name="bow")
        bow_logits = bow([ids, lengths])
        if idf is not None:
            bow.idf.assign(idf.astype("float32"))
        experts.append(layers.Activation("softmax", dtype="float32", name="bow_probabilities")(bow_logits))

    inputs = {"ids": ids, "lengths": lengths}
    stacked = layers.Concatenate(axis=1, name="experts")([layers.Reshape((1, n_classes))(e) for e in experts])
    training_model = keras.Model(inputs, stacked, name="newsgroups_experts")
    if len(experts) == 1:
        classifier = keras.Model(inputs, experts[0], name=f"newsgroups_{cfg.architecture}")
    else:
        classifier = keras.Model(inputs, ExpertMixture(len(experts), name="mixture")(stacked), name=f"newsgroups_{cfg.architecture}")
    return training_model, classifier


def choose_mixture(expert_probs: np.ndarray, labels: np.ndarray, max_weight: float = 4.0,
                   iterations: int = 100) -> tuple[np.ndarray, float]:
    """Weights w in [0, max_weight] minimising the log-loss of softmax(sum_e w_e log p_e) on (expert_probs, labels).

    A weighted sum of the experts' log-probabilities is a logistic regression with one feature per
    expert, so the loss is convex in w: projected Newton steps (a gradient step when Newton's does
    not help) find its minimum in a few iterations. The weights do not have to sum to 1: their sum
    sets how sharp the mixture is and their ratios how much each expert counts, and fitting both
    lets an over-confident expert get a small weight without blunting the mixture. `max_weight`
    bounds the sharpening when the validation slice is separable.
    Log-loss rather than accuracy: on a validation slice of ~1,000 documents accuracy moves in
    steps of single documents. Returns (weights, loss). expert_probs: (documents, experts, classes).
    """
    logs = np.log(np.clip(expert_probs.astype(np.float64), 1e-7, 1.0))
    n = logs.shape[1]
    if n == 1:
        return np.ones(1, dtype=np.float32), _log_loss(expert_probs[:, 0], labels)
    true = logs[np.arange(len(labels)), :, labels]  # (documents, experts): log p_e(label)

    def loss_of(w):
        return _log_loss(mixture_probabilities(expert_probs, w), labels)

    weights = np.full(n, 1.0 / n)
    loss = loss_of(weights)
    for _ in range(iterations):
        p = mixture_probabilities(expert_probs, weights)
        expected = np.einsum("dc,dec->de", p, logs)
        gradient = (expected - true).mean(axis=0)
        centred = logs - expected[:, :, None]
        hessian = np.einsum("dc,dec,dfc->ef", p, centred, centred) / len(labels)
        improved = False
        for direction in (np.linalg.solve(hessian + 1e-9 * np.eye(n), gradient), gradient):
            step = 1.0
            while step > 1e-6:
                candidate = np.clip(weights - step * direction, 0.0, max_weight)
                candidate_loss = loss_of(candidate)
                if candidate_loss < loss - 1e-9:
                    weights, loss, improved = candidate, candidate_loss, True
                    break
                step /= 2
            if improved:
                break
        if not improved:
            break
    return weights.astype(np.float32), loss


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))))


def mixture_probabilities(expert_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    z = np.einsum("dec,e->dc", np.log(np.clip(expert_probs, 1e-7, 1.0)), weights)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int) -> None:
    lr: float | keras.optimizers.schedules.LearningRateSchedule = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=cfg.epochs * steps_per_epoch, alpha=0.05)
    model.compile(
        optimizer=keras.optimizers.Adam(lr, clipnorm=5.0),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def pad_batch(sequences: Sequence[np.ndarray], max_length: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row (capped at max_length, rounded up to `multiple`); empty rows get length 1."""
    lengths = np.array([min(len(s), max_length) for s in sequences], dtype=np.int32)
    width = max(int(lengths.max(initial=0)), 1)
    if multiple > 1:
        width = min(max(max_length, 1), -(-width // multiple) * multiple)
    ids = np.zeros((len(sequences), width), dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : lengths[row]] = seq[: lengths[row]]
    return ids, np.maximum(lengths, 1)


def bucket_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None, pool: int = 50) -> list[np.ndarray]:
    """Batches of indices of similar length: shuffle, sort within pools of `pool` batches, shuffle batch order.

    rng=None: no shuffling (sorted by length), for prediction.
    """
    n = len(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    order = rng.permutation(n)
    batches = []
    span = batch_size * pool
    for start in range(0, n, span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketedBatches(keras.utils.PyDataset):
    """Length-bucketed, right-padded batches ({"ids", "lengths"}[, labels]); reshuffled every epoch."""

    def __init__(self, sequences, labels=None, *, batch_size, max_length, seed=None, multiple=1, targets=1):
        super().__init__()
        self.targets = targets  # labels are repeated once per expert: y is (batch, targets)
        self.sequences, self.labels = list(sequences), None if labels is None else np.asarray(labels, dtype=np.int32)
        self.batch_size, self.max_length, self.seed, self.multiple = batch_size, max_length, seed, multiple
        self.lengths = np.array([min(len(s), max_length) for s in self.sequences], dtype=np.int64)
        self.epoch = 0
        self.batches = self._layout()

    def _layout(self) -> list[np.ndarray]:
        rng = None if self.seed is None else np.random.default_rng([self.seed, self.epoch])
        return bucket_batches(self.lengths, self.batch_size, rng)

    def set_epoch(self, epoch: int) -> None:
        if self.seed is not None and epoch != self.epoch:
            self.epoch = epoch
            self.batches = self._layout()

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        rows = self.batches[index]
        ids, lengths = pad_batch([self.sequences[i] for i in rows], self.max_length, self.multiple)
        x = {"ids": ids, "lengths": lengths}
        if self.labels is None:
            return x
        return x, np.repeat(self.labels[rows][:, None], self.targets, axis=1)

    @property
    def order(self) -> np.ndarray:
        return np.concatenate(self.batches) if self.batches else np.zeros(0, dtype=np.int64)


def load_model(path: str | os.PathLike) -> keras.Model:
    """A saved classifier (its custom layers are registered by importing this module)."""
    return keras.saving.load_model(path, compile=False)


def length_multiple() -> int:
    """JAX compiles once per batch shape: round widths up so a few dozen shapes cover all batches."""
    return 64 if keras.config.backend() == "jax" else 1


def predict_proba(model: keras.Model, sequences: Sequence[np.ndarray], max_length: int, batch_size: int = 256) -> np.ndarray:
    """Class probabilities in the order of `sequences` (batched by length, then put back in order)."""
    # Widths rounded to 32: padding does not change a prediction, and fewer shapes mean fewer retraces.
    data = BucketedBatches(sequences, batch_size=batch_size, max_length=max_length, multiple=max(32, length_multiple()))
    if len(data) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    probs = np.concatenate([np.asarray(model.predict_on_batch(data[i])) for i in range(len(data))])
    out = np.empty_like(probs)
    out[data.order] = probs
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) index arrays; every class keeps at least one training row."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = min(int(round(len(rows) * fraction)), len(rows) - 1)
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


_CKPT_PREFIX = "ckpt-"


def _checkpoints(work_dir: Path) -> list[Path]:
    """Finished-epoch checkpoints, newest first."""
    return sorted((p for p in work_dir.glob(f"{_CKPT_PREFIX}*") if p.is_dir()), reverse=True)


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


class EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch bookkeeping: embedding warm-up, NaN guard, validation, early stopping, checkpoint.

    Validation runs here (not through fit's validation_data): the experts' probabilities on the
    validation slice pick the mixture weights, and the mixture's accuracy drives early stopping.
    Each finished epoch becomes one directory ckpt-<epoch>/ holding the full training state
    (weights + optimizer), the best classifier weights so far and progress.json (history,
    early-stopping counters). It is written under a temporary name and renamed, and the previous
    one is kept, so a run killed at any moment resumes from its last complete epoch, and a
    diverged epoch never overwrites the best weights.
    """

    def __init__(self, cfg: TrainConfig, work_dir: Path, train_data: BucketedBatches, validation: tuple[list, np.ndarray],
                 classifier: keras.Model, history: list[dict], log, max_length: int):
        super().__init__()
        self.cfg, self.work_dir, self.train_data, self.history, self.log = cfg, work_dir, train_data, history, log
        self.validation, self.classifier, self.max_length = validation, classifier, max_length
        best = min(history, key=lambda h: h["val_loss"]) if history else None
        self.best_loss = best["val_loss"] if best else math.inf
        self.best_epoch = best["epoch"] if best else 0
        self.epoch_started = time.perf_counter()
        self.stopped_early = False

    def on_epoch_begin(self, epoch, logs=None):
        self.train_data.set_epoch(epoch)
        after = self.cfg.unfreeze_embeddings_after
        if after is not None:
            self.model.get_layer("glove").unfrozen.assign(1.0 if epoch >= after else 0.0)
        self.epoch_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if not _finite(loss):
            raise TrainingDiverged(
                f"training loss became {float(loss)} at epoch {len(self.history) + 1}, batch {batch + 1}: "
                f"lower learning_rate (now {self.cfg.learning_rate}) or check the embedding matrix for NaN/inf; "
                f"the last good checkpoint stays in {self.work_dir}"
            )

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        sequences, labels = self.validation
        expert_probs = predict_proba(self.model, sequences, self.max_length)
        weights, val_loss = choose_mixture(expert_probs, labels)
        val_accuracy = float((mixture_probabilities(expert_probs, weights).argmax(1) == labels).mean())
        if not (_finite(logs.get("loss")) and np.all(np.isfinite(expert_probs))):
            raise TrainingDiverged(f"epoch {epoch + 1} ended with loss {logs.get('loss')} or non-finite predictions; "
                                   f"the last good checkpoint stays in {self.work_dir}")
        if len(weights) > 1:
            self.classifier.get_layer("mixture").mix.assign(weights)
        row = {
            "epoch": epoch + 1,
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),  # mean over the experts (each trained on its own)
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,  # of the mixture
            "learning_rate": float(ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "seconds": round(time.perf_counter() - self.epoch_started, 3),
            "mixture": [round(float(w), 3) for w in weights],
            "expert_val_accuracy": [round(float((expert_probs[:, i].argmax(1) == labels).mean()), 4)
                                    for i in range(expert_probs.shape[1])],
        }
        self.history.append(row)
        improved = row["val_loss"] < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = row["val_loss"], row["epoch"]
        stop = row["epoch"] - self.best_epoch > self.cfg.patience
        self._save(row["epoch"], improved, stop)
        self.log.info(
            "epoch %d/%d: loss %.4f, val_loss %.4f, val_acc %.4f (experts %s, mixture %s), %.1f s%s",
            row["epoch"], self.cfg.epochs, row["loss"], val_loss, val_accuracy, row["expert_val_accuracy"],
            row["mixture"], row["seconds"], " (best)" if improved else "",
        )
        if stop:
            self.stopped_early = True
            self.model.stop_training = True
            self.log.info("early stop: no lower validation loss for %d epochs (best epoch %d)", self.cfg.patience, self.best_epoch)

    def _save(self, epoch: int, improved: bool, stopped: bool) -> None:
        staging = self.work_dir / f".{_CKPT_PREFIX}tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.model.save_weights(staging / "state.weights.h5")
        previous = _checkpoints(self.work_dir)
        if improved:
            np.savez(staging / "best.npz", *self.classifier.get_weights())
        elif previous and (previous[0] / "best.npz").exists():
            try:  # a hard link: the best weights are not rewritten every epoch
                os.link(previous[0] / "best.npz", staging / "best.npz")
            except OSError:
                shutil.copyfile(previous[0] / "best.npz", staging / "best.npz")
        progress = {"epoch": epoch, "best_epoch": self.best_epoch, "stopped": stopped, "history": self.history}
        (staging / "progress.json").write_text(json.dumps(progress))
        target = self.work_dir / f"{_CKPT_PREFIX}{epoch:04d}"
        shutil.rmtree(target, ignore_errors=True)  # only ever an unreadable one we resumed past
        os.rename(staging, target)
        for old in previous[1:]:  # keep the newest two: the new one and its predecessor
            shutil.rmtree(old, ignore_errors=True)


class TrainingInterrupted(Exception):
    """`should_stop()` asked training to stop; raised between batches, the finished epochs' checkpoints kept."""


class StopWhenAsked(keras.callbacks.Callback):
    """Ends training between two batches once `should_stop()` is true (a SIGTERM, a cancelled run)."""

    def __init__(self, should_stop: Callable[[], bool], work_dir: Path):
        super().__init__()
        self.should_stop, self.work_dir, self.epoch = should_stop, work_dir, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.should_stop():
            raise TrainingInterrupted(f"training stopped on request in epoch {self.epoch + 1}, batch {batch + 1}; "
                                      f"finished epochs are kept in {self.work_dir} and the next run resumes from them")


def _restore(model: keras.Model, work_dir: Path, log) -> dict | None:
    """Load the newest loadable checkpoint into `model`; None when there is none."""
    for ckpt in _checkpoints(work_dir):
        try:
            progress = json.loads((ckpt / "progress.json").read_text())
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(ckpt / "state.weights.h5")
        except Exception as exc:  # noqa: BLE001 - a torn checkpoint: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", ckpt.name, exc)
            shutil.rmtree(ckpt, ignore_errors=True)
            continue
        progress["dir"] = ckpt
        return progress
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    """OOM as each backend reports it (TF ResourceExhaustedError, torch OutOfMemoryError, XLA RESOURCE_EXHAUSTED)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(s in text for s in ("out of memory", "resource_exhausted", "resourceexhausted", "oom when"))


def fit_classifier(
    cfg: TrainConfig,
    sequences: Sequence[np.ndarray],
    labels: np.ndarray,
    matrix: np.ndarray,
    n_classes: int,
    max_length: int,
    work_dir: str | os.PathLike,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[keras.Model, list[dict], dict]:
    """Train on `sequences` (a validation slice of them drives early stopping); resume from work_dir.

    `should_stop` is polled after every batch: when it returns True, TrainingInterrupted is raised.

    Returns (classifier with the best validation weights, per-epoch history, summary).
    """
    log = log or logging.getLogger(_PACKAGE)
    labels = np.asarray(labels, dtype=np.int32)
    check_inputs(matrix, sequences, labels, n_classes)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)

    fit_rows, val_rows = validation_split(labels, cfg.validation_fraction, cfg.seed)
    fit_sequences = [sequences[i] for i in fit_rows]
    idf = inverse_document_frequency(fit_sequences, len(matrix))
    training_model, classifier = build_model(cfg, matrix, n_classes, idf)
    experts = training_model.output_shape[1]
    train_data = BucketedBatches(fit_sequences, labels[fit_rows], batch_size=cfg.batch_size, max_length=max_length,
                                 seed=cfg.seed, multiple=length_multiple(), targets=experts)
    compile_model(training_model, cfg, len(train_data))
    progress = _restore(training_model, work_dir, log)
    history = list(progress["history"]) if progress else []
    initial_epoch = progress["epoch"] if progress else 0
    if progress:
        log.info("resuming from %s: %d of %d epochs done", progress["dir"].name, initial_epoch, cfg.epochs)
    info = device_info()
    log.info("training on %s (%s, keras %s backend): %d train / %d validation documents, %d batches per epoch, %d experts",
             info["device_name"], info["device"], info["backend"], len(fit_rows), len(val_rows), len(train_data), experts)

    checkpoint = EpochCheckpoint(cfg, work_dir, train_data, ([sequences[i] for i in val_rows], labels[val_rows]),
                                 classifier, history, log, max_length)
    started = time.perf_counter()
    if initial_epoch < cfg.epochs and not (progress and progress.get("stopped")):
        try:
            callbacks = [StopWhenAsked(should_stop, work_dir)] if should_stop else []
            training_model.fit(train_data, epochs=cfg.epochs, initial_epoch=initial_epoch, callbacks=[*callbacks, checkpoint],
                               verbose=0)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
            if not _is_out_of_memory(exc):
                raise
            raise PipelineError(
                f"{info['device']} out of memory training with batch_size={cfg.batch_size} on {info['device_name']} "
                f"({type(exc).__name__}); lower train.batch_size or train.lstm_max_tokens. "
                f"Finished epochs are kept in {work_dir} and the next run resumes from them"
            ) from exc
    final = _checkpoints(work_dir)
    if final and (final[0] / "best.npz").exists():
        with np.load(final[0] / "best.npz") as best:
            classifier.set_weights([best[f"arr_{i}"] for i in range(len(best.files))])
    best_row = next((h for h in history if h["epoch"] == checkpoint.best_epoch), None)
    summary = {
        **info,
        "epochs_run": len(history),
        "best_epoch": checkpoint.best_epoch,
        "best_val_accuracy": best_row["val_accuracy"] if best_row else None,
        "mixture": best_row["mixture"] if best_row else None,
        "stopped_early": checkpoint.stopped_early or bool(progress and progress.get("stopped")),
        "resumed_from_epoch": initial_epoch,
        "train_documents": int(len(fit_rows)),
        "validation_documents": int(len(val_rows)),
        "seconds": round(time.perf_counter() - started, 3),
        "seconds_per_epoch": [h["seconds"] for h in history],
    }
    return classifier, history, summary
