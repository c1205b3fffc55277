"""Step "tokens": documents.parquet -> vocab.parquet + sequences.parquet + tokenizer.json, in shards.

The rules are tasks/tokenizer.py's. The work is cut by row groups of documents.parquet: shard i of n
reads row groups i, i+n, i+2n, ... Each stage is a Prefect task; flows/tokenize.py maps them over the
shards, so a thread pool, a process pool or a Dask cluster runs them side by side:

    count_shard  (n) -> tokens-count/<key>/counts.parquet   training words: count, first occurrence
    fit_vocab        -> tokens-vocab/<key>/vocab.parquet    merged counts -> the top num_words
    encode_shard (n) -> tokens-encode/<key>/ids.parquet     one row group per row group read
    tokens           -> tokens/<key>/                       the shards' row groups in document order

A word's first occurrence is carried as (row group << 32) + its rank within the row group, so the
vocabulary and its tie order are those of one pass over the documents: the artifact is byte for byte
the same for any number of shards, and the same as `tokens` called without shards (the whole job in
one task). The shard artifacts are scratch: a shard task returns the tokens artifact at once when it
exists (so a concurrent run that finished first makes the rest of this one a no-op), and `tokens`
removes them once it is published. The key of `tokens` depends only on its config and the corpus.
Memory: one row group of documents at a time, plus the word counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import InputFormatError, TransientError
from storage.files import Staging, interleave_row_groups, iter_row_groups, parquet_row_groups
from storage.schemas import DOCUMENTS, SEQUENCES, VOCAB
from tasks.config import TokenizeConfig
from tasks.step import Step, step_logger
from tasks.tokenizer import OOV_RULE, Rules, count_words, encode, merge_counts, rules_of, split_words, tokenizer_rules, vocabulary

STEP = Step("tokens", version=1)
COUNT = Step("tokens-count", version=1)
VOCAB_STEP = Step("tokens-vocab", version=1)
ENCODE = Step("tokens-encode", version=1)
SHARD_STEPS = (COUNT.name, VOCAB_STEP.name, ENCODE.name)
BATCH_ROWS = 4096  # documents per record batch; results do not depend on it
COUNTS = pa.schema([("token", pa.string()), ("count", pa.int64()), ("first", pa.int64())])
_COLUMNS = ["doc_id", "label", "split", "text"]


# -- pure functions over row groups -------------------------------------------------------------------
def shard_row_groups(row_groups: int, shard: int, shards: int) -> list[int]:
    """The row groups shard `shard` of `shards` reads."""
    return list(range(shard, row_groups, shards))


def _by_row_group(batches: Iterable[tuple[int, pa.RecordBatch]]) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
    for group, pairs in itertools.groupby(batches, key=lambda pair: pair[0]):
        yield group, (batch for _, batch in pairs)


def count_train_words(batches: Iterable[tuple[int, pa.RecordBatch]], rules: Rules) -> pa.Table:
    """(token, count, first) of the words of the training documents in (row group, batch) pairs."""
    tables = []
    for group, group_batches in _by_row_group(batches):
        words = (split_words(b["text"].filter(pc.equal(b["split"], "train")), rules) for b in group_batches)
        counts = count_words(words)
        tables.append(counts.set_column(2, "first", pc.add(counts["first"], pa.scalar(group << 32, pa.int64()))))
        if len(tables) >= 8:  # bound memory: fold as we go
            tables = [merge_counts(tables)]
    return merge_counts(tables) if tables else COUNTS.empty_table()


def encode_row_groups(batches: Iterable[tuple[int, pa.RecordBatch]], vocab: pa.Table, rules: Rules,
                      write: Callable[[pa.Table], None]) -> None:
    """Ids of every document in (row group, batch) pairs, written one SEQUENCES table per row group."""
    for _, group_batches in _by_row_group(batches):
        tables = []
        for batch in group_batches:
            ids, lengths = encode(split_words(batch["text"], rules), vocab, rules)
            tables.append(pa.table([batch["doc_id"], batch["label"], batch["split"], ids, lengths], schema=SEQUENCES))
        write(pa.concat_tables(tables).combine_chunks())


def fitted_vocabulary(counts: pa.Table, num_words: int, source: str) -> pa.Table:
    if counts.num_rows == 0:
        raise InputFormatError(f"{source}: no words in the 'train' split to fit a vocabulary on")
    return vocabulary(counts, num_words)


class SequenceWriter:
    """Writes sequences.parquet one row group per table, counting rows, truncated documents and splits."""

    def __init__(self, writer, max_length: int):
        self.writer, self.max_length = writer, max_length
        self.rows = self.truncated = 0
        self.splits: dict[str, int] = {}

    def __call__(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows
        self.truncated += int(pc.sum(pc.greater(table["length"], self.max_length)).as_py() or 0)
        for value, count in zip(*pc.value_counts(table["split"]).flatten(), strict=True):
            self.splits[value.as_py()] = self.splits.get(value.as_py(), 0) + count.as_py()

    def stats(self, cfg: TokenizeConfig, vocab_size: int, distinct: int, shards: int) -> dict:
        return {"rows": self.rows, "vocab_size": vocab_size, "distinct_train_words": distinct, "shards": shards,
                "truncated_documents": self.truncated, "oov": OOV_RULE, "splits": self.splits,
                "truncation": {"applied": "tokenize", "mode": cfg.truncation, "max_length": cfg.max_length}}


# -- the tasks --------------------------------------------------------------------------------------
def _documents(store: ArtifactStore, corpus: ArtifactRef, row_groups: list[int] | None, columns: list[str]):
    """(row group, batch) pairs of documents.parquet: the given row groups, or all of them."""
    path = store.local_file(corpus, "documents.parquet")
    groups = range(parquet_row_groups(path)) if row_groups is None else row_groups
    return iter_row_groups(path, DOCUMENTS, groups, columns, BATCH_ROWS)


def _finished(store: ArtifactStore, cfg: TokenizeConfig, corpus: ArtifactRef):
    """The tokens artifact (a Cached state inside a task run) if it is already there: the shards are not needed."""
    return STEP.cached(store, STEP.key(cfg, [corpus]))


def _read_shard(read: Callable[[], pa.Table], ref: ArtifactRef) -> pa.Table:
    try:
        return read()
    except FileNotFoundError as exc:  # removed by a concurrent run that published tokens: the retry finds it
        raise TransientError(f"{ref.uri} vanished while it was read (a concurrent run finished this step?)") from exc


@COUNT.task(task_run_name="tokens-count-{shard}")
def count_shard(cfg: TokenizeConfig, corpus: ArtifactRef, shard: int, shards: int, data_home: str | None = None):
    """Word counts of the training documents in shard `shard` of `shards`."""
    if done := _finished(ArtifactStore(data_home), cfg, corpus):
        return done
    params = {"lower": cfg.lower, "filters": cfg.filters, "shard": shard, "shards": shards}

    def build(store: ArtifactStore, out: Staging) -> dict:
        path = store.local_file(corpus, "documents.parquet")
        groups = shard_row_groups(parquet_row_groups(path), shard, shards)
        counts = count_train_words(_documents(store, corpus, groups, ["split", "text"]), rules_of(cfg))
        return {"rows": out.write_parquet("counts.parquet", counts, COUNTS), "row_groups": len(groups)}

    return COUNT.run(data_home, params, [corpus], build)


@VOCAB_STEP.task
def fit_vocab(cfg: TokenizeConfig, corpus: ArtifactRef, counts: list[ArtifactRef], data_home: str | None = None):
    """The vocabulary from every shard's counts."""
    if done := _finished(ArtifactStore(data_home), cfg, corpus):
        return done
    params = {"num_words": cfg.num_words, "lower": cfg.lower, "filters": cfg.filters}

    def build(store: ArtifactStore, out: Staging) -> dict:
        merged = merge_counts([_read_shard(lambda c=c: store.read_parquet(c, "counts.parquet", COUNTS), c) for c in counts])
        vocab = fitted_vocabulary(merged, cfg.num_words, corpus.file("documents.parquet"))
        return {"rows": out.write_parquet("vocab.parquet", vocab, VOCAB), "distinct_train_words": merged.num_rows}

    return VOCAB_STEP.run(data_home, params, counts, build)


@ENCODE.task(task_run_name="tokens-encode-{shard}")
def encode_shard(cfg: TokenizeConfig, corpus: ArtifactRef, vocab: ArtifactRef, shard: int, shards: int,
                 data_home: str | None = None):
    """Ids of the documents in shard `shard` of `shards`: one row group per row group of documents.parquet."""
    if done := _finished(ArtifactStore(data_home), cfg, corpus):
        return done
    params = {**cfg.model_dump(mode="json"), "shard": shard, "shards": shards}

    def build(store: ArtifactStore, out: Staging) -> dict:
        table = _read_shard(lambda: store.read_parquet(vocab, "vocab.parquet", VOCAB), vocab)
        path = store.local_file(corpus, "documents.parquet")
        groups = shard_row_groups(parquet_row_groups(path), shard, shards)
        with out.parquet_writer("ids.parquet", SEQUENCES) as writer:
            sink = SequenceWriter(writer, cfg.max_length)
            encode_row_groups(_documents(store, corpus, groups, _COLUMNS), table, rules_of(cfg), sink)
        return {"rows": sink.rows, "row_groups": len(groups)}

    return ENCODE.run(data_home, params, [corpus, vocab], build)


def write_tokens(cfg: TokenizeConfig, store: ArtifactStore, corpus: ArtifactRef, out: Staging) -> dict:
    """The whole step in this process (no shards)."""
    counts = count_train_words(_documents(store, corpus, None, ["split", "text"]), rules_of(cfg))
    vocab = fitted_vocabulary(counts, cfg.num_words, corpus.file("documents.parquet"))
    out.write_parquet("vocab.parquet", vocab, VOCAB)
    with out.parquet_writer("sequences.parquet", SEQUENCES) as writer:
        sink = SequenceWriter(writer, cfg.max_length)
        encode_row_groups(_documents(store, corpus, None, _COLUMNS), vocab, rules_of(cfg), sink)
    out.write_json("tokenizer.json", tokenizer_rules(cfg, vocab.num_rows, counts.num_rows))
    return sink.stats(cfg, vocab.num_rows, counts.num_rows, 1)


def join_shards(cfg: TokenizeConfig, store: ArtifactStore, vocab: ArtifactRef, parts: list[ArtifactRef], out: Staging) -> dict:
    """vocab.parquet from the vocabulary shard, sequences.parquet from the encoded shards' row groups in document order."""
    vocab_size = _read_shard(lambda: store.read_parquet(vocab, "vocab.parquet", VOCAB), vocab).num_rows
    distinct = (store.read_manifest(vocab) or {})["distinct_train_words"]
    out.copy_in("vocab.parquet", store.local_file(vocab, "vocab.parquet"))
    with out.parquet_writer("sequences.parquet", SEQUENCES) as writer:
        sink = SequenceWriter(writer, cfg.max_length)
        for table in interleave_row_groups([store.local_file(p, "ids.parquet") for p in parts], SEQUENCES):
            sink(table)
    out.write_json("tokenizer.json", tokenizer_rules(cfg, vocab_size, distinct))
    return sink.stats(cfg, vocab_size, distinct, len(parts))


def discard_shards(store: ArtifactStore, shards: list[ArtifactRef]) -> None:
    """Remove the shard artifacts (the vocabulary's counts too) once tokens is published."""
    refs = [ref for ref in shards if ref.step in SHARD_STEPS]
    for ref in list(refs):
        if ref.step == VOCAB_STEP.name:
            refs += [ArtifactRef(step=u["step"], key=u["key"], uri=u["uri"])
                     for u in (store.read_manifest(ref) or {}).get("upstream", []) if u["step"] == COUNT.name]
    for ref in refs:
        try:
            store.remove(ref.step, ref.key)
        except OSError:  # already gone (a concurrent run removed it)
            pass


@STEP.task
def tokens(cfg: TokenizeConfig, corpus: ArtifactRef, shards: list[ArtifactRef] | None = None,
           data_home: str | None = None) -> ArtifactRef:
    """The tokens artifact: from `shards` ([vocabulary, encoded shard 0, 1, ...], see flows/tokenize.py), or,
    without them, built here in one pass."""
    def build(store: ArtifactStore, out: Staging) -> dict:
        stats = join_shards(cfg, store, shards[0], shards[1:], out) if shards else write_tokens(cfg, store, corpus, out)
        step_logger().info("tokens: %s documents, %s words in the vocabulary (%d shard(s))", f"{stats['rows']:,}",
                           f"{stats['vocab_size']:,}", stats["shards"])
        return stats

    result = STEP.run(data_home, cfg, [corpus], build)
    if shards:
        discard_shards(ArtifactStore(data_home), shards)
    return result
