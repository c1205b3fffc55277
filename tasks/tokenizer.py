"""The tokenizer's rules, vectorised with Arrow/numpy: words, counts, vocabulary, ids (the step is tasks/tokens.py).

Rules (identical to keras.preprocessing.text.Tokenizer / text_to_word_sequence with its defaults):
- lowercase with Python's str.lower semantics. Arrow's utf8_lower agrees with it on every code point
  below U+0100; a document holding any code point >= U+0100 (final sigma, dotted capital I, letters
  newer than Python's Unicode tables) is lowercased with str.lower instead, one call per such document;
- every character of `filters` becomes the split character " ", then the text is split on " " only and
  empty pieces are dropped. Like Keras, other whitespace (\\r, \\x0b, \\x0c, \\xa0, U+2003 ...) is NOT a
  separator: it stays inside the word ("a\\rb" is one word);
- the vocabulary is fitted on the TRAINING split only and keeps the `num_words` most frequent words.
  Order (and so ids): count descending, ties by first occurrence in the training documents (in the
  order of documents.parquet, then position in the text) - exactly Keras's stable sort of its
  insertion-ordered word_counts. It is a function of the data only, so ids are identical across runs,
  processes and batch sizes. Ids are 1..vocab_size; 0 is padding and never a word.
  Unlike Keras (whose num_words=N keeps N-1 words, ids < N), num_words=N keeps N words.
- OOV rule "drop": words outside the vocabulary (unseen in train, or beyond num_words) are dropped from
  the id sequence, as Keras's texts_to_sequences does without oov_token. No id is reserved for OOV.
- sequences.parquet: one row per document (documents.parquet order); `length` = number of in-vocabulary
  ids BEFORE truncation; `ids` truncated here to max_length. `truncation` names the part that is KEPT:
  "head" = the first max_length ids (Keras pad_sequences truncating="post"), "tail" = the last ones
  (truncating="pre", the Keras default the original recipe used), "both" = the first ceil(L/2) and the
  last floor(L/2). Padding is left to training (0 = padding id).

Large corpora are processed in record batches: only Arrow buffers of one batch are alive at a time and
no word is ever a Python object. texts_to_ids() applies the same rules to raw text at predict time,
reading them from tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import InputFormatError
from storage.schemas import VOCAB
from tasks.config import TokenizeConfig

SPLIT = " "  # Keras's default split; the one separator every filter character is mapped to
OOV_RULE = "drop"
TRUNCATIONS = ("head", "tail", "both")
_PYTHON_LOWER = r"[^\x{0}-\x{FF}]"  # documents needing str.lower (see module docstring)
# A letter, then n't or 's 'm 'd 'll 've 're ending a word (the Penn Treebank split): "can't" -> "ca n't".
_CONTRACTION = r"([A-Za-z])([Nn]'[Tt]|'(?:[SsMmDd]|[Ll][Ll]|[Vv][Ee]|[Rr][Ee]))\b"


@dataclass(frozen=True)
class Rules:
    lower: bool = True
    filters: str = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
    split: str = SPLIT
    max_length: int | None = None  # None: no truncation
    truncation: str = "head"
    split_contractions: bool = False  # "don't" -> "do n't", "it's" -> "it 's": the words GloVe has vectors for

    def __post_init__(self):
        if self.split != SPLIT:
            raise InputFormatError(f"tokenizer rules: split must be {SPLIT!r}, got {self.split!r}")
        if self.truncation not in TRUNCATIONS:
            raise InputFormatError(f"tokenizer rules: truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if self.max_length is not None and self.max_length < 1:
            raise InputFormatError(f"tokenizer rules: max_length must be >= 1, got {self.max_length}")


def rules_of(rules: Rules | TokenizeConfig | Mapping[str, Any]) -> Rules:
    """Rules from a TokenizeConfig, a tokenizer.json dict, or Rules."""
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, TokenizeConfig):
        return Rules(rules.lower, rules.filters, SPLIT, rules.max_length, rules.truncation, rules.split_contractions)
    if rules.get("oov", OOV_RULE) != OOV_RULE:
        raise InputFormatError(f"tokenizer rules: unsupported oov rule {rules.get('oov')!r} (this code implements {OOV_RULE!r})")
    return Rules(
        bool(rules.get("lower", True)), str(rules["filters"]), str(rules.get("split", SPLIT)),
        rules.get("max_length"), str(rules.get("truncation", "head")), bool(rules.get("split_contractions", False)),
    )


# -- words ------------------------------------------------------------------------------------------
def _as_string_array(texts: Any) -> pa.StringArray:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    elif not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), pa.string())
    if pa.types.is_large_string(texts.type) or pa.types.is_string_view(texts.type):
        texts = texts.cast(pa.string())
    if not pa.types.is_string(texts.type):
        raise InputFormatError(f"texts must be strings, got Arrow type {texts.type}")
    return pc.fill_null(texts, "") if texts.null_count else texts


def lowercase(texts: pa.StringArray) -> pa.StringArray:
    """str.lower on every text: Arrow's kernel, and str.lower for the few texts where they may differ."""
    lowered = pc.utf8_lower(texts)
    special = pc.match_substring_regex(texts, _PYTHON_LOWER)
    if pc.any(special).as_py():
        exact = pa.array([t.lower() for t in texts.filter(special).to_pylist()], pa.string())
        lowered = pc.replace_with_mask(lowered, special, exact)
    return lowered


def split_words(texts: Any, rules: Rules) -> pa.ListArray:
    """list<string> of words per text (no empty words), like Keras's text_to_word_sequence; with
    rules.split_contractions, English contractions are split first as GloVe's tokenizer split them."""
    texts = _as_string_array(texts)
    if rules.split_contractions:
        texts = pc.replace_substring_regex(texts, _CONTRACTION, r"\1 \2")
    byte_map = np.arange(256, dtype=np.uint8)  # applied to every byte of the UTF-8 text
    if rules.lower:
        non_ascii = pc.invert(pc.string_is_ascii(texts))
        if pc.any(non_ascii).as_py():  # Unicode case mapping only where needed; ASCII goes through byte_map
            texts = pc.replace_with_mask(texts, non_ascii, lowercase(texts.filter(non_ascii)))
        byte_map[ord("A") : ord("Z") + 1] += 32
    wide = sorted({c for c in rules.filters if ord(c) > 0x7F})
    if wide:  # multi-byte filter characters: map them to the split character first
        texts = pc.replace_substring_regex(texts, "[" + "".join(f"\\x{{{ord(c):X}}}" for c in wide) + "]", SPLIT)
    byte_map[[ord(c) for c in rules.filters if ord(c) <= 0x7F]] = ord(SPLIT)
    return _split_on_bytes(texts, byte_map)


def _split_on_bytes(texts: pa.StringArray, byte_map: np.ndarray) -> pa.ListArray:
    """Map every byte through byte_map, then split each text at the split byte, dropping empty words.

    Only ASCII bytes are mapped or cut at, and ASCII bytes never occur inside a multi-byte UTF-8
    sequence, so every word stays valid UTF-8. Without the split bytes the words lie back to back,
    which is exactly an Arrow string buffer.
    """
    n = len(texts)
    _, offsets_buf, data_buf = texts.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[texts.offset : texts.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]] if data_buf is not None else np.zeros(0, np.uint8)
    offsets -= offsets[0]
    data = byte_map[data]
    in_word = data != ord(SPLIT)
    starts = in_word.copy()
    starts[1:] &= ~in_word[:-1]
    ends = in_word.copy()
    ends[:-1] &= ~in_word[1:]
    bounds = offsets[(offsets > 0) & (offsets < len(data))]
    starts[bounds] = in_word[bounds]  # a word never continues across documents
    ends[bounds - 1] = in_word[bounds - 1]
    word_starts = np.flatnonzero(starts)
    word_offsets = np.zeros(len(word_starts) + 1, dtype=np.int32)
    np.cumsum(np.flatnonzero(ends) + 1 - word_starts, out=word_offsets[1:])
    words = pa.StringArray.from_buffers(len(word_starts), pa.py_buffer(word_offsets), pa.py_buffer(data[in_word]))
    list_offsets = np.searchsorted(word_starts, offsets).astype(np.int32)  # words before each document
    return pa.ListArray.from_arrays(pa.array(list_offsets, pa.int32()), words)


def _lists(values: pa.Array, parent: np.ndarray, n: int) -> pa.ListArray:
    """ListArray of n lists from values sorted by their (non-decreasing) list index `parent`."""
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(parent, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


# -- vocabulary -------------------------------------------------------------------------------------
def count_words(word_lists: Iterable[pa.ListArray]) -> pa.Table:
    """(token, count, first) over all lists; `first` ranks words by first occurrence."""
    parts, seen = [], 0
    for lists in word_lists:
        counts = pc.value_counts(pc.list_flatten(lists))  # uniques in order of first appearance
        parts.append(pa.table({
            "token": counts.field("values"),
            "count": counts.field("counts"),
            "first": pa.array(np.arange(seen, seen + len(counts), dtype=np.int64)),
        }))
        seen += len(counts)
        if len(parts) >= 8:  # bound memory: fold batches as we go
            parts = [merge_counts(parts)]
    if not parts:
        return pa.table({"token": pa.array([], pa.string()), "count": pa.array([], pa.int64()),
                         "first": pa.array([], pa.int64())})
    return merge_counts(parts)


def merge_counts(parts: list[pa.Table]) -> pa.Table:
    """Counts of several parts summed per word, each word's first occurrence the earliest of its parts'."""
    if len(parts) == 1:
        return parts[0]
    merged = pa.concat_tables(parts).group_by("token").aggregate([("count", "sum"), ("first", "min")])
    return merged.select(["token", "count_sum", "first_min"]).rename_columns(["token", "count", "first"])


def vocabulary(counts: pa.Table, num_words: int) -> pa.Table:
    """The top num_words words as a VOCAB table: count descending, ties by first occurrence; ids from 1."""
    order = pc.sort_indices(counts, sort_keys=[("count", "descending"), ("first", "ascending")])[:num_words]
    top = counts.take(order)
    return pa.table(
        {"token": top["token"], "id": pa.array(np.arange(1, top.num_rows + 1, dtype=np.int32)),
         "count": top["count"].cast(pa.int64())},
        schema=VOCAB,
    )


def fit_vocabulary(texts_batches: Iterable[Any], rules: Rules, num_words: int) -> tuple[pa.Table, int]:
    """(vocab table, number of distinct words) fitted on the given texts."""
    counts = count_words(split_words(texts, rules) for texts in texts_batches)
    return vocabulary(counts, num_words), counts.num_rows


# -- ids ---------------------------------------------------------------------------------------------
def _vocab_arrays(vocab: pa.Table | Mapping[str, int]) -> tuple[pa.Array, pa.Array]:
    if isinstance(vocab, pa.Table):
        return vocab["token"].combine_chunks(), vocab["id"].combine_chunks().cast(pa.int32())
    return pa.array(list(vocab.keys()), pa.string()), pa.array(list(vocab.values()), pa.int32())


def encode(word_lists: pa.ListArray, vocab: pa.Table | Mapping[str, int], rules: Rules) -> tuple[pa.ListArray, pa.Array]:
    """(ids truncated per rules, lengths before truncation) for each list of words; OOV words dropped."""
    tokens, ids = _vocab_arrays(vocab)
    n = len(word_lists)
    position = pc.index_in(pc.list_flatten(word_lists), value_set=tokens)
    found = position.is_valid()
    flat_ids = pc.take(ids, position.filter(found)).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    parent = pc.list_parent_indices(word_lists).to_numpy(zero_copy_only=False)[found.to_numpy(zero_copy_only=False)]
    lengths = np.bincount(parent, minlength=n).astype(np.int32)
    if rules.max_length is not None and len(flat_ids) and lengths.max() > rules.max_length:
        keep = _kept_positions(parent, lengths, rules.max_length, rules.truncation)
        flat_ids, parent = flat_ids[keep], parent[keep]
    return _lists(pa.array(flat_ids, pa.int32()), parent, n), pa.array(lengths, pa.int32())


def _kept_positions(parent: np.ndarray, lengths: np.ndarray, max_length: int, truncation: str) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    position = np.arange(len(parent)) - starts[parent]  # index of each id inside its document
    length = lengths[parent]
    if truncation == "head":
        return position < max_length
    if truncation == "tail":
        return position >= length - max_length
    head = (max_length + 1) // 2
    return (position < head) | (position >= length - (max_length - head))


def texts_to_ids(texts: Any, vocab: pa.Table | Mapping[str, int],
                 rules: Rules | TokenizeConfig | Mapping[str, Any]) -> pa.ListArray:
    """Raw texts -> list<int32> ids with the stored rules (tokenizer.json) and vocabulary (vocab.parquet)."""
    rules = rules_of(rules)
    return encode(split_words(texts, rules), vocab, rules)[0]


def tokenizer_rules(cfg: TokenizeConfig, vocab_size: int, distinct_words: int) -> dict:
    """What tokenizer.json holds: everything needed to tokenize raw text identically later."""
    return {
        "lower": cfg.lower,
        "filters": cfg.filters,
        "split": SPLIT,
        "num_words": cfg.num_words,
        "vocab_size": vocab_size,
        "distinct_train_words": distinct_words,
        "fit_on": "train",
        "order": "count descending, ties by first occurrence in the training documents",
        "padding_id": 0,
        "oov": OOV_RULE,
        "oov_rule": "words not in the vocabulary are dropped from the sequence; no OOV id",
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "split_contractions": cfg.split_contractions,
        "truncation_rule": "applied at tokenize time; names the part kept: head=first, tail=last, "
                           "both=first ceil(L/2)+last floor(L/2)",
        "length": "number of in-vocabulary ids before truncation",
    }
