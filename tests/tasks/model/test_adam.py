"""A pin on how Keras' Adam updates the looked-up tables on TensorFlow, which the default's settings were chosen with.

On the TensorFlow backend a lookup's gradient reaches Adam as one slice per occurrence of a word, and Keras'
Adam squares each slice before summing them: the second moment gets the sum of the squares, not the square
of the sum (the torch and jax backends hand Adam the summed, dense gradient). A word repeated within a batch
therefore moves by more than Adam's step. Adam on the dense gradient instead scored lower on the validation
slice, as distributed and stripped (benchmarks/results/cand_dense_adam.json; README, "Presets and results"),
so a Keras release that changes this changes training: this test says so first.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# Keras is imported inside the test, like every test here: importing TensorFlow at collection changes the
# process's logging and stderr for every test that runs after it.
pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
                                reason="the TensorFlow backend's sparse gradients")


def _first_step(dense: bool, ids: np.ndarray) -> np.ndarray:
    """How far one Adam step (learning rate 0.05) moves each row of a GatedEmbedding's table: looked up (the
    layer as it is), or read through one_hot(ids) @ table (the same rows, but a dense gradient for the table)."""
    import keras
    from keras import ops

    from tasks.model.layers import GatedEmbedding

    class OneHotLookup(GatedEmbedding):
        def call(self, ids):
            return ops.matmul(ops.one_hot(ops.cast(ids, "int32"), self.input_dim), self.embeddings)

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(ids.shape[1],), dtype="int32")
    table = (OneHotLookup if dense else GatedEmbedding)(40, 5, trainable_after=0)
    pooled = keras.layers.GlobalAveragePooling1D()(table(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    table.embeddings.assign(np.random.default_rng(0).normal(size=(40, 5)).astype("float32"))
    table.unfrozen.assign(1.0)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    before = np.asarray(table.embeddings).copy()
    model.train_on_batch(ids, np.array([1]))
    return np.abs(np.asarray(table.embeddings) - before).max(axis=1)


def test_keras_adam_moves_a_word_repeated_in_a_batch_further_than_adams_step():
    ids = np.array([[7, 7, 7, 1, 2, 3]], dtype="int32")  # word 7 three times, words 1-3 once
    dense, sparse = _first_step(True, ids), _first_step(False, ids)
    np.testing.assert_allclose(dense[[1, 2, 3, 7]], 0.05, rtol=1e-3, err_msg="Adam's first step is the learning rate")
    np.testing.assert_allclose(sparse[[1, 2, 3]], 0.05, rtol=1e-3, err_msg="a word seen once: the same step")
    # three equal slices: sum / sqrt(sum of squares) = 3 / sqrt(3)
    assert sparse[7] == pytest.approx(0.05 * np.sqrt(3), rel=1e-3)
    assert dense[0] == sparse[0] == 0.0, "a word not in the batch does not move on the first step"
