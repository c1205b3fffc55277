"""Step "corpus": a corpus archive or table -> documents.parquet (doc_id, group, label, split, text), in bounded memory.

Inputs (the downloaded source file; its name tells which kind):
- a folder-per-label archive (tar, tar.gz, zip): layouts and rules in tasks/corpus_layout.py;
- a table: one Parquet, CSV or JSON Lines file (.parquet, .csv, .jsonl, optionally .gz), one document
  per row, with a text column and a label column and optionally a split column (names in CorpusConfig).
Text is UTF-8, falling back to latin-1 (which cannot fail) per document, counted; empty documents are
kept and counted; CorpusConfig.strip removes headers, footers and quotes like sklearn's remove=.
At most CorpusConfig.max_document_bytes of each archive member is kept: a longer document is cut
there, and the manifest lists it (truncated_documents, truncated_examples: doc_id -> full size).
Member names are percent-escaped by storage.archives.escape_name, so doc_id and group never hold a
raw control character or an undecodable byte.

One pass over the source: each record's text is decoded, cleaned and appended to a spill file on disk
(never extracted, never all in memory); what is kept in memory is one small record per document
(Arrow arrays). The layout then gives the documents' final order, and documents.parquet is written
row group by row group, each gathered from the spill. Memory stays flat as the corpus grows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.archives import Member, iter_archive
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.download import forget_download
from storage.errors import InputFormatError, Interrupted, PipelineError
from storage.files import Spill, Staging
from storage.schemas import DOCUMENTS
from storage.tables import iter_table, table_format
from tasks.config import CorpusConfig
from tasks.corpus_layout import Layout, find_layout, ordered_documents, table_layout
from tasks.step import Step, step_logger

ROW_GROUP_ROWS = 2048  # documents per row group of documents.parquet: the unit later steps shard by
ROW_GROUP_BYTES = 8 << 20  # ... or fewer, when their texts add up to more (what a step holds per row group)
_SPILL_ROWS, _SPILL_BYTES = 4096, 4 << 20
_TEXT = pa.schema([("text", pa.string())])

# -- text cleaning: the semantics of sklearn's fetch_20newsgroups(remove=...) --------------------
_QUOTE_RE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_headers(text: str) -> str:
    """Drop everything up to the first blank line (the message headers)."""
    _before, _blank, after = text.partition("\n\n")
    return after


def strip_quotes(text: str) -> str:
    """Drop quoted lines and attribution lines ("In article ... writes:")."""
    return "\n".join(line for line in text.split("\n") if not _QUOTE_RE.search(line))


def strip_footer(text: str) -> str:
    """Drop the signature block: everything after the last line made only of dashes/blanks."""
    lines = text.strip().split("\n")
    for line_num in range(len(lines) - 1, -1, -1):
        if lines[line_num].strip().strip("-") == "":
            break
    return "\n".join(lines[:line_num]) if line_num > 0 else text


def clean_text(text: str, strip: Iterable[str]) -> str:
    """Apply the requested strippers in sklearn's order: headers, footers, quotes."""
    strip = set(strip)
    if "headers" in strip:
        text = strip_headers(text)
    if "footers" in strip:
        text = strip_footer(text)
    if "quotes" in strip:
        text = strip_quotes(text)
    return text


def decode_text(data: bytes, cut: bool = False) -> tuple[str, bool]:
    """(text, used_fallback): UTF-8 when valid, else latin-1, which decodes any byte string.

    `cut`: the bytes are a document's first max_document_bytes, so a character split at the
    end is dropped rather than making the whole document latin-1."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as exc:
        if cut and exc.reason == "unexpected end of data" and exc.end == len(data):
            return decode_text(data[: exc.start])
        return data.decode("latin-1"), True


# -- one pass over the source: texts to the spill, one small record per member/row in memory --------
class TextSpill:
    """Decodes and cleans each record's text and appends it to a spill file; keeps per record only
    whether it needed the latin-1 fallback, whether it is empty and its size in bytes."""

    def __init__(self, spill: Spill, strip: Iterable[str]):
        self.spill, self.strip = spill, tuple(strip)
        self._texts: list[str] = []
        self._bytes = 0
        self._fallback: list[bool] = []
        self._empty: list[bool] = []
        self._sizes: list[np.ndarray] = []

    def add(self, data: bytes | str | None, cut: bool = False) -> None:
        if isinstance(data, str):
            text, fell_back = data, False
        else:
            text, fell_back = decode_text(data or b"", cut)
        text = clean_text(text, self.strip)
        self._texts.append(text)
        self._fallback.append(fell_back)
        self._empty.append(not text.strip())
        self._bytes += len(text)
        if len(self._texts) >= _SPILL_ROWS or self._bytes >= _SPILL_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._texts:
            texts = pa.array(self._texts, pa.string())
            self._sizes.append(pc.binary_length(texts).to_numpy().astype(np.int64))
            self.spill.write(pa.record_batch([texts], schema=_TEXT))
            self._texts, self._bytes = [], 0

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latin-1 fallback, empty, text bytes) per record, in source order."""
        self._flush()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int64)
        return np.array(self._fallback, dtype=bool), np.array(self._empty, dtype=bool), sizes


def spill_archive(members: Iterable[Member], texts: TextSpill, archive: str
                  ) -> tuple[pa.ChunkedArray, list[str], dict[int, int]]:
    """(file member paths in archive order, directory members, {file ordinal: full size} of the members
    cut at max_document_bytes); every file's text goes to `texts`."""
    chunks, names, dirs, cut = [], [], [], {}
    for member in members:
        if member.is_dir:
            dirs.append(member.name)
            continue
        if member.full_size is not None:
            cut[sum(len(c) for c in chunks) + len(names)] = member.full_size
        names.append(member.name)
        texts.add(member.data, cut=member.full_size is not None)
        if len(names) >= 65_536:
            chunks.append(_names_array(names, archive))
            names = []
    chunks.append(_names_array(names, archive))
    return pa.chunked_array(chunks, pa.string()), dirs, cut


def _names_array(names: list[str], archive: str) -> pa.Array:
    try:
        return pa.array(names, pa.string())
    except (UnicodeEncodeError, pa.ArrowInvalid):
        bad = next(n for n in names if not _is_utf8(n))
        raise InputFormatError(f"{archive}: member name {bad!r} is not valid UTF-8") from None


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def spill_table(batches: Iterable[pa.RecordBatch], cfg: CorpusConfig, texts: TextSpill
                ) -> tuple[pa.ChunkedArray, pa.ChunkedArray | None]:
    """(label column, split column or None) of a table read batch by batch; every row's text goes to `texts`."""
    labels, splits = [], []
    for batch in batches:
        for text in batch.column(cfg.text_column).to_pylist():
            texts.add(text)
        labels.append(batch.column(cfg.label_column))
        if cfg.split_column:
            splits.append(batch.column(cfg.split_column))
    return (pa.chunked_array(labels, pa.string()),
            pa.chunked_array(splits, pa.string()) if cfg.split_column else None)


# -- writing ---------------------------------------------------------------------------------------
def row_groups(sizes: np.ndarray, rows: int, max_bytes: int) -> Iterator[slice]:
    """Consecutive slices of documents: `rows` each, fewer where their texts add up to more than max_bytes."""
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        before = ends[start - 1] if start else 0
        stop = min(start + rows, int(np.searchsorted(ends, before + max_bytes, side="right")), len(sizes))
        stop = max(stop, start + 1)
        yield slice(start, stop)
        start = stop


def build_documents(source: Path, cfg: CorpusConfig, out: Staging) -> dict:
    """Write documents.parquet for the archive or table at `source` into `out`; return the manifest's stats."""
    with out.spill(_TEXT) as spill:
        texts, cut = TextSpill(spill, cfg.strip), {}
        if table_format(source.name):
            columns = [cfg.text_column, cfg.label_column, *([cfg.split_column] if cfg.split_column else [])]
            labels, splits = spill_table(iter_table(source, columns, binary=[cfg.text_column]), cfg, texts)
            layout: Layout = table_layout(labels, splits, str(source))
        else:
            members = iter_archive(source, cfg.max_extracted_bytes, max_member_bytes=cfg.max_document_bytes)
            paths, dirs, cut = spill_archive(members, texts, str(source))
            layout = find_layout(paths, dirs, str(source))
        fallback, empty, sizes = texts.finish()
        docs = ordered_documents(layout, cfg.test_fraction, cfg.seed)
        ordinal = docs["ordinal"].to_numpy()
        with out.parquet_writer("documents.parquet", DOCUMENTS) as writer:
            for part in row_groups(sizes[ordinal], ROW_GROUP_ROWS, ROW_GROUP_BYTES):
                rows = docs.slice(part.start, part.stop - part.start)
                table = pa.table([rows["doc_id"], rows["group"], rows["label"], rows["split"],
                                  spill.take(ordinal[part])["text"]], schema=DOCUMENTS)
                writer.write_table(table, row_group_size=table.num_rows)
    truncated = {doc_id: cut[i] for doc_id, i in zip(docs["doc_id"].to_pylist(), ordinal.tolist(), strict=True) if i in cut}
    return {**corpus_stats(layout, docs, cfg, int(fallback[ordinal].sum()), int(empty[ordinal].sum())),
            "max_document_bytes": cfg.max_document_bytes, "truncated_documents": len(truncated),
            "truncated_examples": dict(sorted(truncated.items())[:100])}  # doc_id -> its full size in bytes


def corpus_stats(layout: Layout, docs: pa.Table, cfg: CorpusConfig, fallbacks: int, empty: int) -> dict:
    counts = pc.value_counts(pc.binary_join_element_wise(docs["group"], docs["split"], "\x00"))
    per_pair = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
    per_group = {g: {s: per_pair.get(f"{g}\x00{s}", 0) for s in ("train", "test")} for g in layout.groups}
    drawn = layout.documents["split"].null_count > 0
    return {
        "rows": docs.num_rows,
        "layout": layout.kind,
        "groups": layout.groups,
        "label_map": {g: i for i, g in enumerate(layout.groups)},
        "split_source": f"stratified(test_fraction={cfg.test_fraction}, seed={cfg.seed})" if drawn
        else ("table" if layout.kind == "table" else "archive"),
        "documents": {s: sum(per_group[g][s] for g in layout.groups) for s in ("train", "test")},
        "per_group": per_group,
        "latin1_fallbacks": fallbacks,
        "empty_documents": empty,
        "ignored_files": layout.ignored,
        "ignored_examples": layout.ignored_examples,
        "strip": list(cfg.strip),
    }


# -- step ------------------------------------------------------------------------------------------
STEP = Step("corpus", version=1)


@STEP.task
def corpus(cfg: CorpusConfig, archive: ArtifactRef, data_home: str | None = None) -> ArtifactRef:
    """Read the downloaded corpus archive or table and publish documents.parquet."""
    def build(store: ArtifactStore, out: Staging) -> dict:
        path = store.only_file(archive)
        try:
            stats = build_documents(path, cfg, out)
        except Interrupted:  # a stop request says nothing about the archive
            raise
        except PipelineError:
            forget_download(archive, data_home)  # an unpinned URL that served an unusable archive is fetched again
            raise
        log = step_logger()
        log.info("corpus %s: %s documents (%s), %d latin-1, %d empty, %d ignored files", path.name, f"{stats['rows']:,}",
                 stats["documents"], stats["latin1_fallbacks"], stats["empty_documents"], stats["ignored_files"])
        if stats["truncated_documents"]:
            log.warning("corpus %s: %d document(s) over corpus.max_document_bytes=%s were cut to that size: %s", path.name,
                        stats["truncated_documents"], f"{cfg.max_document_bytes:,}",
                        ", ".join(f"{d} ({n:,} bytes)" for d, n in list(stats["truncated_examples"].items())[:5]))
        return stats

    return STEP.run(data_home, cfg, [archive], build)
