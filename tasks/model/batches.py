"""Right-padded, length-bucketed batches: {"ids": (batch, width) int32, "lengths": (batch,) int32}."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np


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


def length_multiple() -> int:
    """JAX compiles once per batch shape: round widths up so a few dozen shapes cover all batches."""
    return 64 if keras.config.backend() == "jax" else 1


class BucketedBatches(keras.utils.PyDataset):
    """Length-bucketed, right-padded batches ({"ids", "lengths"}[, labels]).

    With a seed, the batches of epoch e are a function of (seed, e): set_epoch(e) before each epoch
    reshuffles them, and a resumed training gets the batches it would have had. Without a seed they
    are sorted by length (prediction). Labels are repeated once per expert: y is (batch, targets).
    """

    def __init__(self, sequences, labels=None, *, batch_size, max_length, seed=None, multiple=1, targets=1):
        super().__init__()
        self.targets = targets
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
        """Row of `sequences` behind each output row, batch after batch."""
        return np.concatenate(self.batches) if self.batches else np.zeros(0, dtype=np.int64)
