"""Prediction from a run directory alone, on raw strings, tokenized by tasks.tokenizer's rules."""

from __future__ import annotations

import numpy as np
import pytest

from storage.artifacts import ArtifactStore
from storage.errors import InputFormatError
from tests.tasks._training_data import GROUPS, publish_inputs, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tasks.train import train

    home = str(tmp_path_factory.mktemp("home"))
    tokens, embeddings, documents = publish_inputs(home, seed=4)
    ref = train.fn(tiny_config(), tokens, embeddings, data_home=home)
    store = ArtifactStore(home)
    return store.local_dir(ref), store.local_dir(tokens), documents


def test_raw_strings_round_trip_to_the_same_probabilities_as_the_stored_sequences(run_dir):
    import pyarrow.parquet as pq

    from tasks.model import load_model, predict_proba
    from tasks.predict import predict
    from tasks.train import split_sequences

    run, tokens_dir, documents = run_dir
    test = documents.filter(np.asarray(documents["split"].to_pylist()) == "test")
    results = predict(run, test["text"].to_pylist())
    assert len(results) == test.num_rows
    sequences = pq.read_table(tokens_dir / "sequences.parquet")
    stored = sequences.filter(np.asarray(sequences["split"].to_pylist()) == "test")
    expected = predict_proba(load_model(run / "model.keras"), split_sequences(stored), 40)
    got = np.array([[r.probabilities[g] for g in GROUPS] for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    labels, probabilities = zip(*results)  # plain (label, probabilities) tuples
    accuracy = np.mean([label == group for label, group in zip(labels, test["group"].to_pylist())])
    assert accuracy > 0.8
    assert all(set(p) == set(GROUPS) and sum(p.values()) == pytest.approx(1.0, abs=1e-4) for p in probabilities)


def test_new_text_empty_text_and_no_text(run_dir):
    from tasks.predict import predict

    run, _, _ = run_dir
    space, empty = predict(run, ["The ROCKET reached lunar orbit, said NASA.", ""])
    assert space.label == "sci.space" and space.probabilities["sci.space"] > 0.5
    assert empty.label in GROUPS and np.isfinite(list(empty.probabilities.values())).all()
    assert predict(run, []) == []


def test_an_incomplete_run_directory_is_refused(tmp_path):
    from tasks.predict import predict

    (tmp_path / "model.keras").write_bytes(b"")
    with pytest.raises(InputFormatError, match="vocab.parquet"):
        predict(tmp_path, ["hello"])


def test_predictions_stream_a_chunk_at_a_time_with_the_same_results(run_dir):
    from tasks.predict import iter_predictions, predict

    texts = [f"rocket {i} orbit" if i % 2 else f"senate vote {i}" for i in range(11)]
    pulled = []

    def lines():
        for text in texts:
            pulled.append(text)
            yield text

    stream = iter_predictions(run_dir[0], lines(), chunk=3)
    first = next(stream)
    assert len(pulled) == 3, "only the first chunk is read before the first prediction"
    streamed, whole = [first, *stream], predict(run_dir[0], texts)
    assert [p.label for p in streamed] == [p.label for p in whole]
    # other batch shapes may round differently in the last float bits (oneDNN)
    np.testing.assert_allclose([list(p.probabilities.values()) for p in streamed],
                               [list(p.probabilities.values()) for p in whole], atol=1e-6)
