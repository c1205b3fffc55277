"""Right-padded, length-bucketed batches: {"ids": (batch, width) int32, "lengths": (batch,) int32}."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import keras
import numpy as np

from tasks.model.errors import ModelInputError


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


def batch_width(lengths: np.ndarray, max_length: int, multiple: int = 1) -> int:
    """The width pad_batch gives a batch of rows of these lengths."""
    width = max(int(min(lengths.max(initial=0), max_length)), 1)
    return min(max(max_length, 1), -(-width // multiple) * multiple) if multiple > 1 else width


def distinct_first_widths(batches: list[np.ndarray], lengths: np.ndarray, max_length: int, multiple: int = 1) -> list[np.ndarray]:
    """`batches` with the second one swapped for the next batch of another width, if the first two are as wide.

    Keras (TensorFlow backend) builds a PyDataset's input signature from its first two batches and fixes every
    dimension on which they agree: two batches of one width would make every later, narrower batch an error.
    """
    widths = [batch_width(lengths[b], max_length, multiple) for b in batches[:2]]
    if len(widths) < 2 or widths[0] != widths[1]:
        return batches
    other = next((i for i in range(2, len(batches)) if batch_width(lengths[batches[i]], max_length, multiple) != widths[0]),
                 None)
    if other is None:  # every batch is as wide: the fixed width is right
        return batches
    batches = list(batches)
    batches[1], batches[other] = batches[other], batches[1]
    return batches


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


# -- documents as chunks of rows (e.g. Parquet row groups), never all in memory ---------------------------
Chunk = tuple[np.ndarray, list[np.ndarray], np.ndarray]  # (row numbers, sequences, labels) of some rows
WINDOW = 32  # pieces read together: what a training epoch shuffles and the validation pass sorts by length


class Rows:
    """Documents 0..n-1 in `chunks` pieces: load(k) -> the k-th piece's (row numbers, sequences, labels).

    Only the labels of all rows are in memory (4 bytes a document), and `posted` if given (8 bytes: a key that
    grows with posting time, for the "latest" validation slice; None: the row order); sequences are loaded a
    piece at a time.
    """

    def __init__(self, load: Callable[[int], Chunk], chunks: int, labels: np.ndarray, posted: np.ndarray | None = None):
        self.load, self.chunks, self.labels = load, chunks, np.asarray(labels, dtype=np.int32)
        self.posted = None if posted is None else np.asarray(posted, dtype=np.int64)

    @classmethod
    def in_memory(cls, sequences: Sequence[np.ndarray], labels: np.ndarray, chunk_rows: int = 2048,
                  posted: np.ndarray | None = None) -> Rows:
        sequences, labels = list(sequences), np.asarray(labels, dtype=np.int32)
        if len(labels) != len(sequences):
            raise ModelInputError(f"{len(sequences)} sequences but {len(labels)} labels")

        def load(k: int) -> Chunk:
            rows = np.arange(k * chunk_rows, min((k + 1) * chunk_rows, len(sequences)))
            return rows, sequences[rows[0]:rows[-1] + 1] if len(rows) else [], labels[rows]

        return cls(load, -(-len(sequences) // chunk_rows), labels, posted)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray, order: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(row numbers, sequences) of the rows where keep[row], piece by piece (in `order` of pieces)."""
        for k in range(self.chunks) if order is None else order:
            rows, sequences, _ = self.load(int(k))
            mask = keep[rows]
            if mask.any():
                yield rows[mask], [s for s, m in zip(sequences, mask, strict=True) if m]

    def windows(self, keep: np.ndarray, window: int = WINDOW) -> Iterator[list[np.ndarray]]:
        """The sequences of the rows where keep[row], in row order, `window` pieces at a time: batches cut from a
        window are sorted by length across all its pieces (fewer, tighter batches than piece by piece), and memory
        holds one window, whatever the number of documents."""
        for start in range(0, self.chunks, window):
            sequences = [s for _, part in self.select(keep, range(start, min(start + window, self.chunks))) for s in part]
            if sequences:
                yield sequences


class StreamedBatches(keras.utils.PyDataset):
    """Training batches of the rows of `rows` where keep[row], streamed piece by piece.

    An epoch reads the pieces in a seeded order, `window` pieces at a time: their rows are shuffled, sorted
    by length within pools of `pool` batches and cut into batches, whose order is shuffled (rows left over
    from a window's last, short batch go on to the next window). Memory: one window, whatever the number
    of documents. The pieces of a label-sorted file hold few labels each, so a window draws its pieces from
    all over the file. Batches per epoch: ceil(rows kept / batch_size), the same every epoch; the batches of
    epoch e are a function of (seed, e). Keras reads them in order (fit(..., shuffle=False)); an index out
    of order (Keras peeks at the first two for their shapes) restarts the epoch's stream.
    """

    def __init__(self, rows: Rows, keep: np.ndarray, *, batch_size: int, max_length: int, seed: int, multiple: int = 1,
                 targets: int = 1, window: int = WINDOW, pool: int = 50):
        super().__init__()
        self.rows, self.keep, self.batch_size, self.max_length = rows, keep, batch_size, max_length
        self.seed, self.multiple, self.targets, self.window, self.pool = seed, multiple, targets, window, pool
        self.size = int(keep.sum())
        self.epoch, self._stream, self._next = 0, None, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._stream = epoch, None

    def __len__(self):
        return -(-self.size // self.batch_size)

    def __getitem__(self, index):
        if self._stream is None or index != self._next:
            self._stream, self._next = self._batches(), 0
            for _ in range(index):
                next(self._stream)
        self._next = index + 1
        return next(self._stream)

    def _batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.rows.chunks)
        carry: tuple[list, list] = ([], [])
        for start in range(0, len(order), self.window):
            sequences, labels = list(carry[0]), list(carry[1])
            for rows, seqs in self.rows.select(self.keep, order[start:start + self.window]):
                sequences += seqs
                labels += self.rows.labels[rows].tolist()
            last = start + self.window >= len(order)
            cut = len(sequences) if last else len(sequences) - len(sequences) % self.batch_size
            lengths = np.array([min(len(s), self.max_length) for s in sequences[:cut]], dtype=np.int64)
            window_labels = np.asarray(labels[:cut], dtype=np.int32)
            batches = bucket_batches(lengths, self.batch_size, rng, self.pool)
            if start == 0 and self.epoch == 0:  # what Keras peeks at, before any set_epoch
                batches = distinct_first_widths(batches, lengths, self.max_length, self.multiple)
            for batch in batches:
                yield self._pad([sequences[i] for i in batch], window_labels[batch])
            carry = (sequences[cut:], labels[cut:])

    def _pad(self, sequences: list[np.ndarray], labels: np.ndarray):
        ids, lengths = pad_batch(sequences, self.max_length, self.multiple)
        return {"ids": ids, "lengths": lengths}, np.repeat(labels[:, None], self.targets, axis=1)
