"""The experts model: build it, compile it, load a saved classifier, predict class probabilities."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras import layers, ops

from tasks.model.batches import BucketedBatches, length_multiple
from tasks.model.device_batches import batches_for
from tasks.model.errors import ModelInputError
from tasks.model.layers import (
    BagOfWordsScores,
    ExpertProduct,
    FirstSteps,
    GatedEmbedding,
    LastValidStep,
    MaskedAttentionPool,
    MaskedMaxMeanPool,
    MemberMean,
    MergeSteps,
    ReverseWithinLength,
)

if TYPE_CHECKING:  # any object with TrainConfig's attributes works (the GPU benchmark runs without pydantic)
    from tasks.config import TrainConfig


def check_inputs(matrix: np.ndarray, id_range: tuple[int, int], labels: np.ndarray, n_classes: int) -> None:
    """Fail before building anything when the matrix, ids (their lowest and highest) and labels do not fit together."""
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 1:
        raise ModelInputError(f"embedding matrix has shape {matrix.shape}; expected (vocabulary + 1, dim)")
    if not np.all(np.isfinite(matrix)):
        raise ModelInputError("embedding matrix holds NaN or inf values")
    low, top = id_range
    if top >= matrix.shape[0] or low < 0:
        raise ModelInputError(
            f"sequences use token ids {low}..{top} but the embedding matrix has {matrix.shape[0]} rows "
            "(tokens and embeddings artifacts do not belong together)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ModelInputError(f"labels span {labels.min()}..{labels.max()}, expected 0..{n_classes - 1}")


def build_model(cfg: TrainConfig, matrix: np.ndarray, n_classes: int,
                idf: np.ndarray | None = None) -> tuple[keras.Model, keras.Model]:
    """(training model, classifier) sharing their layers.

    Inputs of both: {"ids": (batch, steps) int32 right-padded, "lengths": (batch,) int32}.
    The training model outputs every expert's class probabilities, (batch, experts, classes),
    each trained with its own cross-entropy; the classifier outputs their product (batch, classes).
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

    experts = [_softmax_head(cfg, n_classes, _lstm_features(cfg, vectors, lengths), "lstm")]
    if cfg.swem_expert:
        experts.append(_softmax_head(cfg, n_classes, MaskedMaxMeanPool(name="swem_pool")([vectors, lengths]), "swem"))
    if cfg.bow_expert:
        bow = BagOfWordsScores(vocab, n_classes, name="bow")
        bow_logits = bow([ids, lengths])
        if idf is not None:
            bow.idf.assign(idf.astype("float32"))
        experts.append(layers.Activation("softmax", dtype="float32", name="bow_probabilities")(bow_logits))

    inputs = {"ids": ids, "lengths": lengths}
    stacked = layers.Concatenate(axis=1, name="experts")([layers.Reshape((1, n_classes))(e) for e in experts])
    training_model = keras.Model(inputs, stacked, name="newsgroups_experts")
    combined = experts[0] if len(experts) == 1 else ExpertProduct(len(experts), name="expert_product")(stacked)
    return training_model, keras.Model(inputs, combined, name=f"newsgroups_{cfg.architecture}")


def member_mean(members: Sequence[keras.Model], expert_weights: Sequence[float]) -> keras.Model:
    """One classifier from several of build_model's classifiers (same config, other seeds): each expert is the
    normalised geometric mean of the members' (MemberMean), combined by ExpertProduct with `expert_weights`.
    It has the layers expert_probabilities and evaluate read ("experts", "expert_product") and saves as one model."""
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    lengths = keras.Input(shape=(), dtype="int32", name="lengths")
    inputs = {"ids": ids, "lengths": lengths}
    stacks = [keras.Model(m.inputs, m.get_layer("experts").output, name=f"member_{i + 1}")(inputs)
              for i, m in enumerate(members)]
    experts = MemberMean(name="experts")(stacks)
    product = ExpertProduct(len(expert_weights), name="expert_product")
    classifier = keras.Model(inputs, product(experts), name=f"{members[0].name}_x{len(members)}")
    product.expert_weights.assign(np.asarray(expert_weights, dtype="float32"))
    return classifier


def _lstm_features(cfg: TrainConfig, vectors, lengths):
    """The LSTM expert's features: its last valid output (lstm_last) or max+mean pooling (lstm_pool, bilstm_pool)."""
    seq, seq_lengths = vectors, lengths
    if cfg.lstm_max_tokens:
        seq, seq_lengths = FirstSteps(cfg.lstm_max_tokens, name="lstm_window")([vectors, lengths])
    if cfg.lstm_stride > 1:
        seq, seq_lengths = MergeSteps(cfg.lstm_stride, name="merge_steps")([seq, seq_lengths])
    if cfg.architecture == "lstm_last":
        out = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm")(seq)
        return LastValidStep(name="last_step")([out, seq_lengths])
    out = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm_forward")(seq)
    if cfg.architecture == "bilstm_pool":
        reversed_in = ReverseWithinLength(name="reverse_in")([seq, seq_lengths])
        backward = layers.LSTM(cfg.lstm_units, return_sequences=True, name="lstm_backward")(reversed_in)
        backward = ReverseWithinLength(name="reverse_out")([backward, seq_lengths])
        out = layers.Concatenate(name="bilstm")([out, backward])
    pooled = MaskedMaxMeanPool(name=cfg.architecture)([out, seq_lengths])
    if not getattr(cfg, "attention_pool", False):
        return pooled
    return layers.Concatenate(name="lstm_features")([pooled, MaskedAttentionPool(name="attention_pool")([out, seq_lengths])])


def _softmax_head(cfg: TrainConfig, n_classes: int, features, name: str):
    if cfg.dropout:
        features = layers.Dropout(cfg.dropout, name=f"{name}_dropout")(features)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name=f"{name}_probabilities")(features)


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Adam with gradient clipping; constant or cosine-decayed learning rate; one cross-entropy per expert."""
    lr: float | keras.optimizers.schedules.LearningRateSchedule = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=cfg.epochs * steps_per_epoch, alpha=0.05)
    smoothing = getattr(cfg, "lstm_label_smoothing", 0.0)
    loss = expert_cross_entropy([smoothing] + [0.0] * (model.output_shape[1] - 1)) if smoothing else None
    model.compile(
        optimizer=keras.optimizers.Adam(lr, clipnorm=5.0),
        loss=loss or "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def expert_cross_entropy(smoothing: Sequence[float]):
    """Each expert's cross-entropy (y_true (batch, experts) labels, y_pred (batch, experts, classes)), with its own
    label smoothing: the target puts smoothing[e] of its mass evenly on every class."""
    def loss(y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        eps = ops.convert_to_tensor(np.asarray(smoothing, dtype="float32"))[None, :, None]
        target = ops.one_hot(ops.cast(y_true, "int32"), classes) * (1.0 - eps) + eps / ops.cast(classes, "float32")
        return -ops.mean(ops.sum(target * ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1), axis=-1)

    return loss


def load_model(path: str | os.PathLike) -> keras.Model:
    """A saved classifier (its custom layers are registered by importing tasks.model.layers)."""
    return keras.saving.load_model(path, compile=False)


def expert_names(cfg: TrainConfig) -> list[str]:
    """The experts build_model stacks, in order."""
    return ["lstm"] + ["swem"] * bool(cfg.swem_expert) + ["bow"] * bool(cfg.bow_expert)


def expert_probabilities(classifier: keras.Model, sequences: Sequence[np.ndarray], max_length: int,
                         batch_size: int = 256) -> np.ndarray:
    """Each expert's class probabilities (documents, experts, classes) from a classifier build_model made."""
    experts = keras.Model(classifier.inputs, classifier.get_layer("experts").output)
    return predict_proba(experts, sequences, max_length, batch_size)


def predict_proba(model: keras.Model, sequences: Sequence[np.ndarray], max_length: int, batch_size: int = 256) -> np.ndarray:
    """Class probabilities in the order of `sequences` (batched by length, then put back in order)."""
    return predict_batches(model, prediction_batches(sequences, max_length, batch_size))


def prediction_batches(sequences: Sequence[np.ndarray], max_length: int, batch_size: int = 256) -> BucketedBatches:
    """Batches sorted by length, on the device where the backend allows (tasks.model.device_batches)."""
    # Widths rounded to 32: padding does not change a prediction, and fewer shapes mean fewer retraces.
    return batches_for(sequences, batch_size=batch_size, max_length=max_length, multiple=max(32, length_multiple()))


def predict_batches(model: keras.Model, data: BucketedBatches) -> np.ndarray:
    """Class probabilities of every row of `data`, in the order of its sequences."""
    if len(data) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    probs = np.concatenate([np.asarray(model.predict_on_batch(data[i])) for i in range(len(data))])
    out = np.empty_like(probs)
    out[data.order] = probs
    return out
