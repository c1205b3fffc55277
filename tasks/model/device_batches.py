"""Batches whose data stays on the accelerator: uploaded once, each batch a gather there.

The host batches (StreamedBatches for training, BucketedBatches for prediction) pad every batch on the
host and copy it to the device: on a GPU that is a blocking host-to-device copy per step, and the padding
itself is Python work the GPU waits for. DeviceBatches uploads the documents once, a piece at a time (one
piece of padded ids on the host at any moment: host memory does not grow with the corpus), with their
lengths and labels, and each epoch's row order once; a batch is then a slice of that order and a gather
on the device, and its width (the longest document in it) is known on the host, so no step waits.

Only where Keras hands a PyDataset's tensors to the model unchanged (torch, jax); TensorFlow's adapter
turns them back into numpy through tf.data, so there the host batches stay. Documents whose padded ids
would take more than MAX_DEVICE_BYTES stay on the host too, streamed as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import keras
import numpy as np
from keras import ops

from tasks.model.batches import BucketedBatches, Rows, StreamedBatches, bucket_batches, pad_batch

MAX_DEVICE_BYTES = 2 * 1024**3  # padded ids beyond this stay on the host


def device_resident(n_documents: int, max_length: int) -> bool:
    """Whether batches should live on the device: a backend that keeps them there, and room for them."""
    return keras.config.backend() in ("torch", "jax") and n_documents * max(max_length, 1) * 4 <= MAX_DEVICE_BYTES


def batches_for(sequences: Sequence[np.ndarray], labels=None, **options) -> BucketedBatches | DeviceBatches:
    """Prediction batches of documents in memory: DeviceBatches where device_resident says so, else BucketedBatches
    (same arguments, same batches)."""
    if device_resident(len(sequences), max((min(len(s), options["max_length"]) for s in sequences), default=1)):
        return DeviceBatches([(list(sequences), labels)], **options)
    return BucketedBatches(sequences, labels, **options)


def training_batches(rows: Rows, keep: np.ndarray, **options) -> StreamedBatches | DeviceBatches:
    """The batches of the rows where keep[row]: on the device where they fit (DeviceBatches), else streamed."""
    if device_resident(int(keep.sum()), options["max_length"]):
        return DeviceBatches(((seqs, rows.labels[numbers]) for numbers, seqs in rows.select(keep)), **options)
    return StreamedBatches(rows, keep, **options)


def validation_batches(rows: Rows, keep: np.ndarray, max_length: int) -> DeviceBatches | None:
    """The validation slice's prediction batches built once on the device where they fit; None: stream it."""
    if not device_resident(int(keep.sum()), max_length):
        return None
    return DeviceBatches(((seqs, None) for _, seqs in rows.select(keep)), batch_size=256, max_length=max_length,
                         multiple=32)


class DeviceBatches(keras.utils.PyDataset):
    """BucketedBatches' layout (length buckets, a function of (seed, epoch); sorted by length without a seed)
    served from device-resident tensors. `pieces`: (sequences, labels or None) of consecutive documents."""

    def __init__(self, pieces: Iterable[tuple[list[np.ndarray], np.ndarray | None]], *, batch_size: int, max_length: int,
                 seed: int | None = None, multiple: int = 1, targets: int = 1):
        super().__init__()
        self.batch_size, self.max_length, self.seed, self.multiple = batch_size, max_length, seed, multiple
        ids, lengths, labels = [], [], []
        for sequences, piece_labels in pieces:  # one piece padded on the host at a time
            piece_ids, _ = pad_batch(sequences, max_length)
            ids.append(ops.convert_to_tensor(piece_ids))
            lengths.append(np.array([min(len(s), max_length) for s in sequences], dtype=np.int64))
            if piece_labels is not None:
                labels.append(np.asarray(piece_labels, dtype=np.int32))
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        width = min(max(max_length, 1), -(-max(int(self.lengths.max(initial=0)), 1) // multiple) * multiple)  # widest batch
        self._ids = ops.concatenate([ops.pad(p, [[0, 0], [0, width - p.shape[1]]]) for p in ids]) if ids else None
        self._lengths = ops.convert_to_tensor(np.maximum(self.lengths, 1).astype(np.int32))
        self._labels = ops.convert_to_tensor(np.repeat(np.concatenate(labels)[:, None], targets, axis=1)) if labels else None
        self.epoch = 0
        self._layout()

    def _layout(self) -> None:
        """The epoch's batches and their rows, batch after batch, on the device (one copy per epoch)."""
        rng = None if self.seed is None else np.random.default_rng([self.seed, self.epoch])
        self.batches = bucket_batches(self.lengths, self.batch_size, rng)
        self._starts = np.concatenate([[0], np.cumsum([len(b) for b in self.batches])]).astype(int)
        self._rows = ops.convert_to_tensor(self.order.astype(np.int32))

    @property
    def order(self) -> np.ndarray:
        """Document behind each output row, batch after batch (as BucketedBatches.order)."""
        return np.concatenate(self.batches) if self.batches else np.zeros(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        if self.seed is not None and epoch != self.epoch:
            self.epoch = epoch
            self._layout()

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        rows = self._rows[self._starts[index]: self._starts[index + 1]]
        longest = int(self.lengths[self.batches[index]].max(initial=1))
        width = min(max(self.max_length, 1), -(-longest // self.multiple) * self.multiple)
        x = {"ids": ops.take(self._ids, rows, axis=0)[:, :width], "lengths": ops.take(self._lengths, rows, axis=0)}
        return x if self._labels is None else (x, ops.take(self._labels, rows, axis=0))
