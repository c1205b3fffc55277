import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import SchemaMismatch
from storage.schemas import VOCAB, vectors_schema
from tasks.config import EmbeddingsConfig
from tasks.embeddings import STEP, coverage, embedding_matrix, embeddings

DIM = 4
WORDS = ["the", "cat", "sat", "mat", "dog"]
VECTORS = np.arange(len(WORDS) * DIM, dtype=np.float32).reshape(-1, DIM) / 10 + 1


def vectors_table(words=WORDS, rows=VECTORS) -> pa.Table:
    flat = pa.array(np.asarray(rows, dtype=np.float32).ravel())
    return pa.table({"word": words, "vector": pa.FixedSizeListArray.from_arrays(flat, DIM)}, schema=vectors_schema(DIM))


def vocab_table(tokens, counts=None) -> pa.Table:
    counts = counts or [10 * (len(tokens) - i) for i in range(len(tokens))]
    return pa.table({"token": tokens, "id": pa.array(range(1, len(tokens) + 1), pa.int32()), "count": pa.array(counts, pa.int64())}, schema=VOCAB)


def publish(home, step, key, name, table, schema) -> ArtifactRef:
    return ArtifactStore(home).publish(step, key, build=lambda d: {"rows": d.write_parquet(name, table, schema)}, version=1, params={})


def test_rows_are_the_vectors_of_their_words_and_misses_are_zero():
    vocab = vocab_table(["cat", "unknownword", "the", "zzz"])
    matrix, hit = embedding_matrix(vocab, vectors_table(), "zeros")
    assert matrix.dtype == np.float32 and matrix.shape == (5, DIM)
    np.testing.assert_array_equal(matrix[0], 0)
    np.testing.assert_array_equal(matrix[1], VECTORS[1])
    np.testing.assert_array_equal(matrix[3], VECTORS[0])
    np.testing.assert_array_equal(matrix[[2, 4]], 0)
    assert hit.tolist() == [False, True, False, True, False]


def test_normal_init_is_seeded_and_leaves_hits_and_padding_alone():
    vocab = vocab_table(["cat", "nope1", "the", "nope2", "dog"])
    a, _ = embedding_matrix(vocab, vectors_table(), "normal", seed=7)
    b, _ = embedding_matrix(vocab, vectors_table(), "normal", seed=7)
    c, _ = embedding_matrix(vocab, vectors_table(), "normal", seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[[2, 4]], c[[2, 4]])
    np.testing.assert_array_equal(a[[1, 3, 5]], c[[1, 3, 5]])
    np.testing.assert_array_equal(a[0], 0)
    assert np.all(a[[2, 4]] != 0)
    known = VECTORS[[1, 0, 4]]
    rng = np.random.default_rng(7)  # the documented rule: one block, ascending miss ids
    np.testing.assert_allclose(a[[2, 4]], rng.normal(known.mean(0), known.std(0), size=(2, DIM)).astype(np.float32))


def test_coverage_counts_types_and_token_weighted_hits():
    vocab = vocab_table(["the", "qqq", "cat", "zzz", "www"], counts=[50, 30, 10, 30, 5])
    _, hit = embedding_matrix(vocab, vectors_table())
    stats = coverage(vocab, hit, top=2)
    assert stats["vocab_size"] == 5 and stats["hits"] == 2 and stats["misses"] == 3
    assert stats["hit_rate_types"] == pytest.approx(0.4)
    assert stats["hit_rate_tokens"] == pytest.approx(60 / 125)
    assert stats["top_missing"] == [{"token": "qqq", "count": 30}, {"token": "zzz", "count": 30}]


def test_embeddings_task_writes_mappable_matrix_and_coverage(home):
    tokens = publish(home, "tokens", "t1", "vocab.parquet", vocab_table(["dog", "xyz", "cat"]), VOCAB)
    vectors = publish(home, "glove", "g1", "vectors.parquet", vectors_table(), vectors_schema(DIM))
    cfg = EmbeddingsConfig(oov_init="zeros")
    ref = embeddings.fn(cfg, tokens, vectors, data_home=home)
    assert ref.step == "embeddings" and ref.key == STEP.key(cfg, [tokens, vectors]) and ref.rows == 4
    matrix = np.load(Path(ref.uri) / "matrix.npy", mmap_mode="r")
    assert isinstance(matrix, np.memmap) and matrix.shape == (4, DIM) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[1], VECTORS[4])
    np.testing.assert_array_equal(matrix[2], 0)
    stats = json.loads((Path(ref.uri) / "coverage.json").read_text())
    assert (stats["hits"], stats["misses"], stats["top_missing"]) == (2, 1, [{"token": "xyz", "count": 20}])
    assert ArtifactStore(home).read_manifest(ref)["coverage"]["hits"] == 2
    again = embeddings.fn(cfg, tokens, vectors, data_home=home)
    assert again == ref
    normal = embeddings.fn(EmbeddingsConfig(oov_init="normal"), tokens, vectors, data_home=home)
    assert normal.key != ref.key


def test_vectors_with_wrong_schema_are_refused(home):
    tokens = publish(home, "tokens", "t1", "vocab.parquet", vocab_table(["dog"]), VOCAB)
    bad = pa.table({"word": ["dog"], "vector": pa.array([[1.0, 2.0]], pa.list_(pa.float64()))})
    bad_schema = bad.schema
    vectors = publish(home, "glove", "g1", "vectors.parquet", bad, bad_schema)
    with pytest.raises(SchemaMismatch, match="vector"):
        embeddings.fn(EmbeddingsConfig(), tokens, vectors, data_home=home)


def test_a_repeated_vector_word_keeps_its_first_vector():
    table = vectors_table(["cat", "dog", "cat", "the", "mat"], VECTORS)
    matrix, hit = embedding_matrix(vocab_table(["cat"]), table)
    np.testing.assert_array_equal(matrix[1], VECTORS[0])
    assert hit.tolist() == [False, True]
