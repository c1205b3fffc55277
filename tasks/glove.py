"""Step "glove": one glove.6B.<dim>d.txt member, read straight from the zip -> vectors.parquet.

The text is parsed by Arrow's streaming CSV reader, block by block (space-delimited, no quoting, no null
markers: GloVe has the words "null", "nan" and "n/a"), not by a Python loop. Every line must
be a word plus exactly `dim` finite floats; anything else is an InputFormatError naming the
member and the 1-based line (found by a slow re-scan, only once parsing has failed).
Duplicate words keep their first vector (GloVe is ordered by frequency) and are counted.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from storage.archives import open_zip, open_zip_member
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.download import forget_download
from storage.errors import InputFormatError, Interrupted, PipelineError
from storage.files import Staging
from storage.schemas import vectors_schema
from tasks.config import GloveConfig
from tasks.step import Step, step_logger

_BLOCK_BYTES = 8 << 20  # read block by block: 32 MiB blocks parsed no faster and held 120 MiB more (measured)


def glove_member(dim: int) -> str:
    return f"glove.6B.{dim}d.txt"


def parse_vectors(stream: IO[bytes], dim: int, source: str = "vectors",
                  reopen: Callable[[], IO[bytes]] | None = None) -> tuple[pa.Table, dict]:
    """Parse GloVe text (word + dim floats per line) into (table in vectors_schema(dim), stats).

    `reopen` gives a fresh stream of the same bytes; it is used only to find the line number
    of an error (without it, `stream` must be seekable).
    """
    names = ["word", *(f"v{i}" for i in range(dim))]
    bad_rows = []

    def on_invalid_row(row) -> str:
        bad_rows.append(row)
        return "error"

    word_chunks, parts = [], []
    try:
        reader = pacsv.open_csv(  # block by block: each block's floats go into a matrix part and the block is freed
            stream,
            read_options=pacsv.ReadOptions(column_names=names, block_size=_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False, escape_char=False,
                                             ignore_empty_lines=False, invalid_row_handler=on_invalid_row),
            convert_options=pacsv.ConvertOptions(column_types={"word": pa.string(), **{n: pa.float32() for n in names[1:]}},
                                                 null_values=[], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False, check_utf8=True),
        )
        for batch in reader:
            word_chunks.append(batch.column(0))
            parts.append(np.column_stack([batch.column(i).to_numpy() for i in range(1, dim + 1)]).astype(np.float32, copy=False))
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        if bad_rows and bad_rows[0].number is not None:
            row = bad_rows[0]
            raise InputFormatError(f"{source}, line {row.number}: expected a word and {dim} values, "
                                   f"got {row.actual_columns - 1} values") from None
        fresh = reopen() if reopen else _rewound(stream)
        with fresh:
            raise _locate_error(fresh, dim, source) or InputFormatError(f"{source}: unparsable ({exc})") from None
    if not parts or sum(len(p) for p in parts) == 0:
        raise InputFormatError(f"{source}: no vectors (empty file)")
    words = pa.chunked_array(word_chunks, pa.string()).combine_chunks()
    lines = len(words)
    start = 0
    for part in parts:  # the first non-finite value, by line
        finite = np.isfinite(part).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            bad = part[row][~np.isfinite(part[row])][0]
            raise InputFormatError(f"{source}, line {start + row + 1}: value {bad} is not finite "
                                   f"(word {words[start + row].as_py()!r})")
        start += len(part)
    # One vector chunk per block, on the blocks' own buffers: the floats are never copied into one matrix.
    vectors = pa.chunked_array(
        [pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1), pa.float32()), dim) for p in parts],
        pa.list_(pa.float32(), dim))
    out = pa.Table.from_arrays([words, vectors], schema=vectors_schema(dim))
    del parts, vectors

    out, duplicate_examples = _first_of_each_word(out, words)
    stats = {"dim": dim, "lines": lines, "words": out.num_rows, "duplicate_words": lines - out.num_rows,
             "duplicate_examples": duplicate_examples}
    return out, stats


def _first_of_each_word(table: pa.Table, words: pa.Array) -> tuple[pa.Table, list[str]]:
    """The table keeping only the first line of a repeated word, and up to 10 of the dropped words."""
    if pc.count_distinct(words).as_py() == len(words):
        return table, []
    first = (pa.table({"word": words, "row": pa.array(np.arange(len(words)))})
             .group_by("word", use_threads=False).aggregate([("row", "min")]))
    keep = np.sort(first.column("row_min").to_numpy())
    dropped = np.setdiff1d(np.arange(len(words)), keep)
    return table.take(pa.array(keep)), words.take(pa.array(dropped[:10])).to_pylist()


def _rewound(stream: IO[bytes]) -> IO[bytes]:
    stream.seek(0)
    return stream


def _locate_error(stream: IO[bytes], dim: int, source: str) -> InputFormatError | None:
    """Find the first malformed line by a line-by-line scan (error path only)."""
    for number, raw in enumerate(stream, 1):
        line = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return InputFormatError(f"{source}, line {number}: not UTF-8 at byte {exc.start} of the line")
        fields = text.split(" ")
        if len(fields) != dim + 1:
            return InputFormatError(f"{source}, line {number}: expected a word and {dim} values, got {len(fields) - 1} values")
        for token in fields[1:]:
            try:
                value = float(token)
            except ValueError:
                return InputFormatError(f"{source}, line {number}: {token!r} is not a number (word {fields[0]!r})")
            if not math.isfinite(value):
                return InputFormatError(f"{source}, line {number}: value {token!r} is not finite (word {fields[0]!r})")
    return None


def read_glove_zip(path: str | Path, dim: int, max_bytes: int | None = None) -> tuple[pa.Table, dict]:
    """Parse glove.6B.<dim>d.txt streamed out of the zip at `path` (nothing extracted to disk)."""
    member = glove_member(dim)
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    with open_zip(path, **kwargs) as zf:
        source = f"{path}:{member}"
        with open_zip_member(zf, member) as stream:
            try:
                return parse_vectors(stream, dim, source, reopen=lambda: open_zip_member(zf, member))
            except InputFormatError:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # e.g. "Bad CRC-32" while streaming
                raise InputFormatError(f"{source}: corrupt member ({type(exc).__name__}: {exc})") from exc


# -- step ------------------------------------------------------------------------------------------
STEP = Step("glove", version=1)


@STEP.task
def glove(cfg: GloveConfig, archive: ArtifactRef, data_home: str | None = None) -> ArtifactRef:
    """Parse the downloaded GloVe zip's <dim>d member and publish vectors.parquet."""
    def build(store: ArtifactStore, out: Staging) -> dict:
        try:
            table, stats = read_glove_zip(store.only_file(archive), cfg.dim)
        except Interrupted:  # a stop request says nothing about the archive
            raise
        except PipelineError:
            forget_download(archive, data_home)  # an unpinned URL that served an unusable archive is fetched again
            raise
        rows = out.write_parquet("vectors.parquet", table, vectors_schema(cfg.dim))
        step_logger().info("glove %s: %s words x %d (%d duplicate lines dropped)", glove_member(cfg.dim), f"{rows:,}",
                           cfg.dim, stats["duplicate_words"])
        return {"rows": rows, "member": glove_member(cfg.dim), **stats}

    return STEP.run(data_home, cfg, [archive], build)
