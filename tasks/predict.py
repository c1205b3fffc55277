"""Classify raw text with nothing but a run directory (model.keras, vocab.parquet, tokenizer.json, labels.json).

Raw text goes through tasks.tokenize.texts_to_ids with the rules stored in tokenizer.json, so
it is tokenized exactly like the training documents were.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from storage.errors import InputFormatError
from storage.files import read_json, read_parquet
from storage.schemas import VOCAB

REQUIRED = ("model.keras", "vocab.parquet", "tokenizer.json", "labels.json")
PREDICT_CHUNK = 4096  # texts tokenized and classified together


class Prediction(NamedTuple):
    label: str  # the most probable group
    probabilities: dict[str, float]  # every group -> probability


@lru_cache(maxsize=4)
def _load(run_dir: str, stamp: float):
    """(model, vocab, rules, names) of a run; cached per directory and modification time."""
    from tasks.model import load_model  # imports Keras

    root = Path(run_dir)
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        raise InputFormatError(f"{root} is not a complete run directory: missing {', '.join(missing)}")
    vocab = read_parquet(root / "vocab.parquet", VOCAB)
    rules, names = read_json(root / "tokenizer.json"), read_json(root / "labels.json")
    return load_model(root / "model.keras"), vocab, rules, names


def iter_predictions(run_dir: str | os.PathLike, texts: Iterable[str], batch_size: int = 256,
                     chunk: int = PREDICT_CHUNK) -> Iterator[Prediction]:
    """(label, probabilities) for each raw text, in order, `chunk` texts at a time: memory stays one chunk deep
    however many texts come (a generator of lines streams through)."""
    from tasks.model import predict_proba
    from tasks.tokenizer import texts_to_ids

    root = Path(run_dir).resolve()
    model, vocab, rules, names = _load(str(root), (root / "model.keras").stat().st_mtime if root.exists() else 0.0)
    texts = iter(texts)
    while part := list(itertools.islice(texts, chunk)):
        ids = texts_to_ids(part, vocab, rules)
        offsets = ids.offsets.to_numpy()
        values = ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)[offsets[0] : offsets[-1]]
        sequences = np.split(values, offsets[1:-1] - offsets[0])
        max_length = int(rules.get("max_length") or max((len(s) for s in sequences), default=1) or 1)
        for row in predict_proba(model, sequences, max_length, batch_size):
            yield Prediction(names[int(row.argmax())], {name: float(p) for name, p in zip(names, row, strict=True)})


def predict(run_dir: str | os.PathLike, texts: Sequence[str], batch_size: int = 256) -> list[Prediction]:
    """(label, probabilities) for each raw text, in order."""
    return list(iter_predictions(run_dir, texts, batch_size))
