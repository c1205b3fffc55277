"""Training batches streamed piece by piece (tasks.model.StreamedBatches, Rows) and training from Parquet row groups."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactStore
from storage.checkpoints import CheckpointDir
from storage.schemas import DOCUMENTS
from tasks.config import TokenizeConfig
from tests.tasks._training_data import synthetic_documents, tiny_config


def label_sorted_rows(n: int = 300, classes: int = 5, chunk_rows: int = 10):
    """Rows whose pieces hold one label each (like row groups of a label-sorted file); row r's ids are [r + 1]."""
    from tasks.model import Rows

    labels = np.repeat(np.arange(classes), n // classes)
    return Rows.in_memory([np.array([r + 1], np.int32) for r in range(n)], labels, chunk_rows=chunk_rows)


def epoch_batches(data, epoch: int) -> list:
    data.set_epoch(epoch)
    return [data[i] for i in range(len(data))]


def test_streamed_batches_hold_every_kept_row_once_with_mixed_labels_and_a_fixed_count():
    from tasks.model import StreamedBatches

    rows = label_sorted_rows()
    keep = np.ones(len(rows), dtype=bool)
    keep[::7] = False  # e.g. the validation slice
    data = StreamedBatches(rows, keep, batch_size=16, max_length=5, seed=3, window=6, pool=2)
    assert len(data) == -(-int(keep.sum()) // 16)
    first = epoch_batches(data, 0)
    seen = np.concatenate([x["ids"][:, 0] - 1 for x, _ in first])
    assert sorted(seen.tolist()) == np.flatnonzero(keep).tolist()  # each kept row once, no other
    for x, y in first:
        assert np.array_equal(y[:, 0], rows.labels[x["ids"][:, 0] - 1])  # labels travel with their rows
    mixed = np.mean([len(np.unique(y)) for _, y in first])
    assert mixed >= 3, f"batches of a label-sorted file must mix labels (mean {mixed} labels per batch)"

    again = epoch_batches(data, 0)
    assert all(np.array_equal(a[0]["ids"], b[0]["ids"]) for a, b in zip(first, again, strict=True))  # (seed, epoch)
    other = epoch_batches(data, 1)
    assert not all(np.array_equal(a[0]["ids"], b[0]["ids"]) for a, b in zip(first, other, strict=True))
    data.set_epoch(0)
    peeked = [data[1], data[0], data[1], data[2]]  # Keras peeks at the first two, then starts over
    assert all(np.array_equal(p[0]["ids"], first[i][0]["ids"]) for p, i in zip(peeked, [1, 0, 1, 2], strict=True))


def test_windows_give_the_kept_rows_in_row_order_a_window_of_pieces_at_a_time():
    """The validation pass predicts a window at a time: its batches are sorted by length across the window's
    pieces, and its probabilities must line up with the slice's labels, in row order."""
    rows = label_sorted_rows(n=95, chunk_rows=10)  # 10 pieces, the last one short
    keep = np.zeros(len(rows), dtype=bool)
    keep[[0, 9, 10, 33, 57, 58, 94]] = True
    windows = list(rows.windows(keep, window=4))  # pieces 0-3, 4-7, 8-9
    assert [[int(s[0]) - 1 for s in w] for w in windows] == [[0, 9, 10, 33], [57, 58], [94]]
    assert [len(w) for w in rows.windows(keep, window=100)] == [7]
    assert list(rows.windows(np.zeros(len(rows), dtype=bool))) == []


def test_an_epochs_first_two_batches_differ_in_width_so_keras_fixes_no_width(tmp_path):
    """Keras (TF) takes its input signature from the first two batches: most documents here are cut to
    max_length, so two full-width batches would come first for many seeds, and a narrower one would then fail."""
    from storage.checkpoints import CheckpointDir
    from tasks.model import StreamedBatches, fit_classifier
    from tasks.model.batches import Rows

    sequences, labels, matrix = _mostly_long_sequences()
    rows = Rows.in_memory(sequences, labels, chunk_rows=16)
    for seed in range(20):
        data = StreamedBatches(rows, np.ones(len(rows), dtype=bool), batch_size=8, max_length=12, seed=seed)
        assert data[0][0]["ids"].shape[1] != data[1][0]["ids"].shape[1], seed
    fit_classifier(tiny_config(epochs=2, batch_size=8, refit=True), sequences, labels, matrix, 3, 12, CheckpointDir(tmp_path))


def _mostly_long_sequences(n: int = 96):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    sequences = [np.concatenate([[1 + label], rng.integers(4, 30, size=30 if i % 12 else 3)]).astype(np.int32)
                 for i, label in enumerate(labels)]
    matrix = rng.normal(0, 0.5, size=(30, 6)).astype(np.float32)
    matrix[0] = 0
    return sequences, labels, matrix


def publish_row_grouped_inputs(home: str, rows_per_group: int = 24):
    """The tiny task's corpus written in many small row groups (so tokens has them too), its tokens and a matrix."""
    from tasks.tokens import tokens

    store = ArtifactStore(home)
    documents = synthetic_documents(n_train=320, n_test=120, seed=4)
    documents = documents.sort_by([("split", "ascending"), ("label", "ascending"), ("doc_id", "ascending")])

    def build(staging):
        with staging.parquet_writer("documents.parquet", DOCUMENTS) as writer:
            writer.write_table(documents, row_group_size=rows_per_group)
        return {"rows": documents.num_rows}

    corpus = store.publish("corpus", "row-grouped", build, version=1, params={})
    token_ref = tokens.fn(TokenizeConfig(num_words=200, max_length=40), corpus, data_home=home)
    vocab_size = pq.read_table(store.local_dir(token_ref) / "vocab.parquet").num_rows
    matrix = np.random.default_rng(4).normal(0, 0.5, size=(vocab_size + 1, 8)).astype(np.float32)
    matrix[0] = 0.0
    embeddings = store.publish("embeddings", "row-grouped", lambda d: d.write_npy("matrix.npy", matrix), version=1,
                               params={}, upstream=[token_ref])
    return token_ref, embeddings, matrix


@pytest.mark.timeout(240)
def test_training_streamed_from_parquet_row_groups_reaches_the_accuracy_of_in_memory_training(tmp_path):
    from tasks.config import EvaluateConfig
    from tasks.evaluate import evaluate
    from tasks.model import fit_classifier, predict_proba
    from tasks.train import split_sequences, train

    home = str(tmp_path / "home")
    token_ref, embeddings, matrix = publish_row_grouped_inputs(home)
    store = ArtifactStore(home)
    assert pq.ParquetFile(store.local_dir(token_ref) / "sequences.parquet").num_row_groups == 440 // 24 + 1
    cfg = tiny_config(epochs=3)

    run = train.fn(cfg, token_ref, embeddings, data_home=home)  # streamed: ids read a row group at a time
    streamed = store.read_json(evaluate.fn(EvaluateConfig(), run, token_ref, data_home=home), "metrics.json")["accuracy"]

    table = pq.read_table(store.local_dir(token_ref) / "sequences.parquet")
    split = np.asarray(table["split"].to_pylist())
    sequences, labels = split_sequences(table), table["label"].to_numpy().astype(np.int32)
    train_rows, test_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    classifier, _, _ = fit_classifier(cfg, [sequences[i] for i in train_rows], labels[train_rows], matrix, 4, 40,
                                      CheckpointDir(tmp_path / "in-memory"))
    probabilities = predict_proba(classifier, [sequences[i] for i in test_rows], 40)
    in_memory = float((probabilities.argmax(1) == labels[test_rows]).mean())

    assert streamed > 0.8 and in_memory > 0.8, (streamed, in_memory)
    assert abs(streamed - in_memory) <= 0.08, (streamed, in_memory)


def test_latest_validation_slice_comes_from_the_article_numbers_read_in_the_streaming_pass(tmp_path):
    """train.validation = "latest": each label's highest file numbers (doc_id), not its last rows (here the rows are
    sorted by doc_id as text, so "train/g/96" comes after "train/g/316")."""
    import pyarrow.compute as pc

    from tasks.model import validation_split
    from tasks.train import training_rows

    home = str(tmp_path / "home")
    token_ref, _, _ = publish_row_grouped_inputs(home)
    store = ArtifactStore(home)
    rows = training_rows(store, token_ref, posted=True)
    table = pq.read_table(store.local_dir(token_ref) / "sequences.parquet", columns=["doc_id", "split"])
    numbers = np.array([int(d.rsplit("/", 1)[1]) for d in table.filter(pc.equal(table["split"], "train"))["doc_id"].to_pylist()])
    assert rows.posted.tolist() == numbers.tolist() and training_rows(store, token_ref).posted is None

    _, latest = validation_split(rows.labels, 0.1, 0, "latest", rows.posted)
    for label in np.unique(rows.labels):
        picked = sorted(numbers[latest][rows.labels[latest] == label])
        assert len(picked) == round((rows.labels == label).sum() * 0.1)
        assert picked == sorted(numbers[rows.labels == label])[-len(picked):]
    assert set(latest) != set(validation_split(rows.labels, 0.1, 0, "latest")[1])  # not merely the last rows
