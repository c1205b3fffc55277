"""Local files: the one place outside the artifact store that reads or writes them.

`Staging` is what a step's build function writes into (a private directory that the store
publishes when it is complete); the readers below are what tasks use for a file a user gave
(a config file, a text to classify) or a local copy of an artifact file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from storage.errors import InputFormatError, WriteError
from storage.schemas import check_schema


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputFormatError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
    return Path(path).read_bytes()


def decode_text_input(data: bytes) -> str:
    """A user's text as bytes -> str: UTF-8, undecodable bytes become U+FFFD (the one rule for files,
    stdin and arguments, so the same bytes give the same text; no newline translation)."""
    return data.decode("utf-8", errors="replace")


def read_document(path: str | os.PathLike) -> str:
    """A user's text file (decode_text_input of its bytes)."""
    return decode_text_input(Path(path).read_bytes())


def iter_document_lines(source: str | os.PathLike | BinaryIO) -> Iterator[str]:
    """The lines of a user's text file (a path) or binary stream (stdin), read one at a time so memory does not
    grow with the input; split as str.splitlines splits the decoded whole (a UTF-8 sequence never holds b"\n")."""
    with open(source, "rb") if isinstance(source, str | os.PathLike) else nullcontext(source) as stream:
        for raw in stream:
            yield from decode_text_input(raw).splitlines()


def read_parquet(path: str | os.PathLike, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    check_schema(pq.read_schema(path), schema, str(path))
    return pq.read_table(path, columns=columns)


def parquet_head(path: str | os.PathLike, rows: int) -> tuple[int, pa.Schema, pa.Table | None]:
    """(row count, schema, first rows) of a Parquet file, reading only its first row group."""
    file = pq.ParquetFile(path)
    head = file.read_row_group(0).slice(0, rows) if file.num_row_groups else None
    return file.metadata.num_rows, file.schema_arrow, head


def parquet_rows(path: str | os.PathLike) -> int:
    return pq.read_metadata(path).num_rows


# What a write to a local file system fails with (pyarrow sets errno too); not network errors, which may be retried.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)) and exc.errno in WRITE_ERRNOS


@contextmanager
def naming_path(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Turn a write failure inside the block into a WriteError that names `path`: a failed write
    (ENOSPC, EACCES, EROFS) often carries no file name, and pyarrow's carry none at all."""
    try:
        yield
    except OSError as exc:
        if not is_write_error(exc):
            raise
        raise write_error(exc, path, action) from exc


def write_error(exc: OSError, path: str | os.PathLike, action: str = "write") -> WriteError:
    why = f"{exc.strerror} (errno {exc.errno})" if exc.strerror else str(exc)
    if exc.filename and str(exc.filename) != str(path):
        why += f" at {exc.filename}"
    hint = {errno.ENOSPC: "; the disk is full: free space there and run again",
            errno.EDQUOT: "; the disk quota is exhausted: free space there and run again",
            errno.EACCES: "; check the permissions of that directory (or use --data-home)",
            errno.EROFS: "; that file system is read-only (use --data-home)"}.get(exc.errno, "")
    return WriteError(f"could not {action} {path}: {why}{hint}")


def parquet_row_groups(path: str | os.PathLike) -> int:
    return pq.read_metadata(path).num_row_groups


def iter_row_groups(path: str | os.PathLike, schema: pa.Schema, row_groups: Sequence[int], columns: list[str] | None = None,
                    batch_size: int = 65_536) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row group, record batch) of the given row groups of a local Parquet file, in that order; schema checked first.

    Memory: one batch. Lets shards of a step each read their own row groups.
    """
    parquet = pq.ParquetFile(path)
    check_schema(parquet.schema_arrow, schema, str(path))
    for group in row_groups:
        for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns):
            yield group, batch


def interleave_row_groups(paths: Sequence[str | os.PathLike], schema: pa.Schema) -> Iterator[pa.Table]:
    """Row groups of several Parquet files taken in turn (file 0's first, file 1's first, ..., file 0's second, ...)
    until every file is exhausted: the order back when file i holds row groups i, i+n, i+2n ... of a whole."""
    files = [pq.ParquetFile(path) for path in paths]
    for path, parquet in zip(paths, files, strict=True):
        check_schema(parquet.schema_arrow, schema, str(path))
    for index in range(max((f.num_row_groups for f in files), default=0)):
        for parquet in files:
            if index < parquet.num_row_groups:
                yield parquet.read_row_group(index)


class Staging:
    """The private directory a step writes its artifact's files into before the store publishes it.

    Every write names its file when it fails (WriteError), e.g. on a full disk."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, name: str) -> Path:
        """Where a library that writes to a path (Keras, matplotlib) should write file `name`."""
        return self.dir / name

    def write_parquet(self, name: str, table: pa.Table, schema: pa.Schema) -> int:
        """Write a table after checking its schema; return its row count."""
        check_schema(table.schema, schema, str(self.dir / name))
        with naming_path(self.dir / name):
            pq.write_table(table, self.dir / name, compression="zstd")
        return table.num_rows

    @contextmanager
    def parquet_writer(self, name: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """A writer for one Parquet file, fed table by table (row group by row group)."""
        with naming_path(self.dir / name), pq.ParquetWriter(self.dir / name, schema, compression="zstd") as writer:
            yield writer

    def write_json(self, name: str, obj: Any) -> None:
        with naming_path(self.dir / name):
            write_json(self.dir / name, obj)

    def write_npy(self, name: str, array: np.ndarray) -> None:
        with naming_path(self.dir / name):
            np.save(self.dir / name, array)

    def move_in(self, name: str, source: Path) -> None:
        with naming_path(self.dir / name, f"move {source} to"):
            os.replace(source, self.dir / name)

    def copy_in(self, name: str, source: Path) -> None:
        with naming_path(self.dir / name, f"copy {source} to"):
            shutil.copyfile(source, self.dir / name)

    @contextmanager
    def spill(self, schema: pa.Schema) -> Iterator[Spill]:
        """A temporary Arrow file beside the staging directory, for data too big to keep in memory."""
        with tempfile.TemporaryDirectory(prefix=f"{self.dir.name}-spill-", dir=self.dir.parent) as scratch:
            yield Spill(Path(scratch) / "spill.arrow", schema)


class Spill:
    """Record batches written once, then read back memory-mapped: in order (one batch in memory), or
    gathered by row number (`take`: only the rows asked for)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self._starts = [0]  # first row of each batch, then the row count

    @property
    def rows(self) -> int:
        return self._starts[-1]

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self._starts.append(self._starts[-1] + batch.num_rows)

    def _close_writer(self) -> None:
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows with these numbers (in write order, counting from 0), in the order asked for.

        The file is mapped for this call only: the pages touched leave the process's memory with the map.
        """
        self._close_writer()
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self._starts)
        batch_of = np.searchsorted(starts, rows, side="right") - 1
        order = np.argsort(batch_of, kind="stable")
        wanted, batch_of = rows[order], batch_of[order]
        batches, first = np.unique(batch_of, return_index=True)
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            pieces = [reader.get_batch(int(b)).take(pa.array(wanted[lo:hi] - starts[b]))
                      for b, lo, hi in zip(batches, first, [*first[1:], len(wanted)], strict=True)]
            gathered = pa.Table.from_batches(pieces, schema=self.schema)
            return gathered.take(pa.array(np.argsort(order))).combine_chunks()  # copies: nothing points into the map

    def batches(self) -> Iterator[pa.RecordBatch]:
        self._close_writer()
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)


def read_config_file(path: str) -> dict:
    """A TOML or JSON file shaped like PipelineConfig (tables/objects for the sub-configs)."""
    from storage.errors import UsageError

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} not found")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
        else:
            import tomllib

            data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a table/object at the top level")
    return data
