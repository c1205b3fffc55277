"""A tiny corpus a model can learn in two epochs, and the artifacts train/evaluate read (shared by
test_train.py, test_evaluate.py and test_predict.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.schemas import DOCUMENTS
from tasks.config import TokenizeConfig, TrainConfig

GROUPS = ["comp.graphics", "rec.sport.hockey", "sci.space", "talk.politics"]
KEYWORDS = {
    "comp.graphics": ["pixel", "render", "polygon", "shader", "bitmap", "texture"],
    "rec.sport.hockey": ["puck", "goalie", "skate", "stanley", "rink", "slapshot"],
    "sci.space": ["orbit", "rocket", "nasa", "shuttle", "lunar", "satellite"],
    "talk.politics": ["senate", "ballot", "congress", "policy", "vote", "election"],
}
FILLER = ("the a of and to in is it that for on with as was by this be are or from at an not but have "
          "they which one you were all we when there can would been has more if will so no").split()
EMPTY_TEXTS = ("", "!!! ... ???", "--\n>> ~~")  # no word survives the tokenizer's filters


def synthetic_documents(n_train: int = 200, n_test: int = 80, seed: int = 0, empty_per_split: int = 3) -> pa.Table:
    """DOCUMENTS table: filler words with 1-3 keywords of the document's group; a few empty documents."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = i % len(GROUPS)
            group = GROUPS[label]
            if i < empty_per_split:
                text = EMPTY_TEXTS[i % len(EMPTY_TEXTS)]
            else:
                words = list(rng.choice(FILLER, size=rng.integers(3, 30)))
                for _ in range(rng.integers(1, 4)):
                    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(KEYWORDS[group])).capitalize())
                text = "Subject: " + " ".join(words) + "."
            rows.append((f"{split}/{group}/{i}", group, label, split, text))
    doc_id, group, label, split, text = zip(*rows)
    return pa.table({"doc_id": doc_id, "group": group, "label": pa.array(label, pa.int16()), "split": split, "text": text},
                    schema=DOCUMENTS)


def publish_inputs(home: str, dim: int = 8, seed: int = 0, nan_row: bool = False, **corpus) -> tuple[ArtifactRef, ArtifactRef, pa.Table]:
    """(tokens ref, embeddings ref, documents) in the store at `home`: a corpus artifact, the real
    tokenize step on it, and a random embedding matrix (row 0 = padding = zeros)."""
    from tasks.tokens import tokens as tokenize

    store = ArtifactStore(home)
    documents = synthetic_documents(seed=seed, **corpus)
    corpus_ref = store.publish(
        "corpus", f"synthetic{seed}", build=lambda d: {"rows": d.write_parquet("documents.parquet", documents, DOCUMENTS)},
        version=1, params={"seed": seed},
    )
    tokens = tokenize.fn(TokenizeConfig(num_words=200, max_length=40), corpus_ref, data_home=home)
    vocab_size = pq.read_table(store.local_dir(tokens) / "vocab.parquet").num_rows

    def write_matrix(d):
        matrix = np.random.default_rng(seed).normal(0, 0.5, size=(vocab_size + 1, dim)).astype(np.float32)
        matrix[0] = 0.0
        if nan_row:
            matrix[1:] = np.nan
        d.write_npy("matrix.npy", matrix)
        return {"rows": len(matrix)}

    embeddings = store.publish("embeddings", f"synthetic{seed}-{dim}-{int(nan_row)}", build=write_matrix, version=1,
                               params={"dim": dim}, upstream=[tokens])
    return tokens, embeddings, documents


def tiny_config(**changes) -> TrainConfig:
    """The default preset's architecture, shrunk to train in seconds (two refit members, not the default's three:
    the averaging is the same code, one member fewer keeps CI short)."""
    base = dict(lstm_units=8, lstm_max_tokens=30, epochs=2, batch_size=16, learning_rate=1e-2, patience=5,
                validation_fraction=0.2, unfreeze_embeddings_after=1, refit_members=2)
    return TrainConfig(**{**base, **changes})


def synthetic_sequences(n: int = 120, vocab: int = 30, classes: int = 3, seed: int = 0, empty: int = 0):
    """(sequences, labels, matrix) without any artifact: id 1+c is the keyword of class c."""
    rng = np.random.default_rng(seed)
    sequences, labels = [], []
    for i in range(n):
        label = i % classes
        seq = rng.integers(classes + 1, vocab, size=rng.integers(2, 25)).astype(np.int32)
        seq[rng.integers(0, len(seq))] = 1 + label
        sequences.append(np.zeros(0, np.int32) if i < empty else seq)
        labels.append(label)
    matrix = rng.normal(0, 0.5, size=(vocab, 6)).astype(np.float32)
    matrix[0] = 0
    return sequences, np.array(labels), matrix
