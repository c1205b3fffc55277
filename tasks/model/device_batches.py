"""Batches whose data stays on the accelerator: uploaded once, each batch a gather there.

BucketedBatches pads every batch on the host and copies it to the device: on a GPU that is a
blocking host-to-device copy per step (from pageable memory), and the padding itself is Python
work the GPU waits for. DeviceBatches pads every document once into one (documents, width) array,
uploads it (with lengths and labels) once, and uploads each epoch's row order once; a batch is
then a slice of that order and a gather on the device, and its width (the longest document in it)
is known on the host, so no step waits for the device.

Only where Keras hands a PyDataset's tensors to the model unchanged (torch, jax); TensorFlow's
adapter turns them back into numpy through tf.data, so there the host batches stay (tf.data
prefetches them). Corpora too big for `MAX_DEVICE_BYTES` stay on the host too.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tasks.model.batches import BucketedBatches, pad_batch

MAX_DEVICE_BYTES = 2 * 1024**3  # padded ids beyond this stay on the host


def device_resident(n_documents: int, max_length: int) -> bool:
    """Whether batches should live on the device: a backend that keeps them there, and room for them."""
    return keras.config.backend() in ("torch", "jax") and n_documents * max_length * 4 <= MAX_DEVICE_BYTES


def batches_for(sequences, labels=None, **options) -> BucketedBatches:
    """DeviceBatches where device_resident says so, else BucketedBatches (same arguments, same batches)."""
    lengths = [min(len(s), options["max_length"]) for s in sequences]
    fits = device_resident(len(sequences), max(lengths, default=1))
    return (DeviceBatches if fits else BucketedBatches)(sequences, labels, **options)


class DeviceBatches(BucketedBatches):
    """BucketedBatches (same layout, same batches) served from device-resident tensors."""

    def __init__(self, sequences, labels=None, **options):
        super().__init__(sequences, labels, **options)
        ids, lengths = pad_batch(self.sequences, self.max_length)
        self._ids, self._lengths = ops.convert_to_tensor(ids), ops.convert_to_tensor(lengths)
        self._labels = None if self.labels is None else ops.convert_to_tensor(
            np.repeat(self.labels[:, None], self.targets, axis=1))
        self._upload_order()

    def _upload_order(self) -> None:
        """The epoch's rows, batch after batch, on the device (one copy per epoch); batch i = rows[starts[i]:starts[i+1]]."""
        self._starts = np.concatenate([[0], np.cumsum([len(b) for b in self.batches])]).astype(int)
        self._rows = ops.convert_to_tensor(self.order.astype(np.int32))

    def set_epoch(self, epoch: int) -> None:
        before = self.epoch
        super().set_epoch(epoch)
        if self.epoch != before:
            self._upload_order()

    def __getitem__(self, index):
        rows = self._rows[self._starts[index]: self._starts[index + 1]]
        longest = int(self.lengths[self.batches[index]].max(initial=1))
        width = min(max(self.max_length, 1), -(-longest // self.multiple) * self.multiple)
        x = {"ids": ops.take(self._ids, rows, axis=0)[:, :width], "lengths": ops.take(self._lengths, rows, axis=0)}
        return x if self._labels is None else (x, ops.take(self._labels, rows, axis=0))
