"""vocab.parquet + vectors.parquet -> matrix.npy (float32) + coverage.json, by a vectorised join.

Row i of the matrix is the vector of the word with id i; row 0 (padding) is zeros; the matrix has
vocab_size + 1 rows (= num_words + 1 whenever the training split has at least num_words distinct
words). Words the vectors do not know ("misses") get, per cfg.oov_init:
- "zeros": zero rows;
- "normal": draws from a normal distribution with the per-dimension mean and standard deviation of
  the hit rows (the known vectors of this vocabulary), drawn with numpy's default_rng(cfg.seed) as one
  (misses x dim) block filled in ascending id order. Same vocabulary, vectors and seed -> same matrix.
  With no hits at all the misses are zeros.
matrix.npy is a plain .npy file: np.load(path, mmap_mode="r") maps it without reading it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import SchemaMismatch
from storage.files import Staging
from storage.schemas import VOCAB, vectors_schema
from tasks.config import EmbeddingsConfig
from tasks.step import Step

TOP_MISSING = 50


def vector_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32>[dim] column as a (rows, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)


def embedding_matrix(vocab: pa.Table, vectors: pa.Table, oov_init: str = "zeros", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, hit) where matrix[id] is the vector of vocab's word `id` and hit[id] says it was found."""
    if oov_init not in ("zeros", "normal"):
        raise ValueError(f"oov_init must be 'zeros' or 'normal', got {oov_init!r}")
    ids = vocab["id"].to_numpy()
    dim = vectors.schema.field("vector").type.list_size
    matrix = np.zeros((int(ids.max(initial=0)) + 1, dim), dtype=np.float32)
    # Probe every vector word against the (small) vocabulary, then copy only the matching rows.
    position = pc.index_in(vectors["word"], value_set=vocab["token"].combine_chunks())
    found = position.is_valid()
    rows = np.flatnonzero(found.to_numpy(zero_copy_only=False))
    words, first = np.unique(position.filter(found).to_numpy(), return_index=True)  # a repeated word keeps its first vector
    matrix[ids[words]] = vector_rows(vectors["vector"].take(rows[first]))
    hit = np.zeros(len(matrix), dtype=bool)
    hit[ids[words]] = True
    miss_ids = np.flatnonzero(~hit[1:]) + 1
    if oov_init == "normal" and hit.any() and len(miss_ids):
        known = matrix[hit]
        draws = np.random.default_rng(seed).normal(known.mean(axis=0), known.std(axis=0), size=(len(miss_ids), dim))
        matrix[miss_ids] = draws.astype(np.float32)
    return matrix, hit


def coverage(vocab: pa.Table, hit: np.ndarray, top: int = TOP_MISSING) -> dict:
    """Hits and misses of the vocabulary, by word types and weighted by their training counts."""
    ids = vocab["id"].to_numpy()
    counts = vocab["count"].to_numpy()
    found = hit[ids]
    missing = vocab.filter(pa.array(~found)).sort_by([("count", "descending"), ("id", "ascending")]).slice(0, top)
    total = int(counts.sum())
    return {
        "vocab_size": int(len(ids)),
        "hits": int(found.sum()),
        "misses": int((~found).sum()),
        "hit_rate_types": round(float(found.mean()), 6) if len(ids) else 0.0,
        "hit_rate_tokens": round(float(counts[found].sum() / total), 6) if total else 0.0,
        "tokens": total,
        "top_missing": [{"token": t, "count": c} for t, c in zip(missing["token"].to_pylist(), missing["count"].to_pylist())],
    }


# -- step ------------------------------------------------------------------------------------------
STEP = Step("embeddings", version=1)


def read_vectors(store: ArtifactStore, ref: ArtifactRef) -> pa.Table:
    """vectors.parquet of a glove artifact, checked against vectors_schema(dim) for its own dim."""
    schema = store.parquet_schema(ref, "vectors.parquet")
    field = schema.field("vector") if "vector" in schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type):
        raise SchemaMismatch(f"{ref.file('vectors.parquet')}: field 'vector' must be fixed_size_list<float32>, got {field}")
    return store.read_parquet(ref, "vectors.parquet", vectors_schema(field.type.list_size))


def write_embeddings(cfg: EmbeddingsConfig, vocab: pa.Table, vectors: pa.Table, out: Staging) -> dict:
    matrix, hit = embedding_matrix(vocab, vectors, cfg.oov_init, cfg.seed)
    out.write_npy("matrix.npy", matrix)
    stats = {**coverage(vocab, hit), "dim": int(matrix.shape[1]), "rows": int(matrix.shape[0]),
             "oov_init": cfg.oov_init, "seed": cfg.seed}
    out.write_json("coverage.json", stats)
    return {"rows": int(matrix.shape[0]), "shape": list(matrix.shape),
            "coverage": {k: stats[k] for k in ("vocab_size", "hits", "misses", "hit_rate_types", "hit_rate_tokens")}}


@STEP.task
def embeddings(cfg: EmbeddingsConfig, tokens: ArtifactRef, vectors: ArtifactRef, data_home: str | None = None) -> ArtifactRef:
    def build(store: ArtifactStore, out: Staging) -> dict:
        return write_embeddings(cfg, store.read_parquet(tokens, "vocab.parquet", VOCAB), read_vectors(store, vectors), out)

    return STEP.run(data_home, cfg, [tokens, vectors], build)
