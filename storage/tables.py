"""Reading a table a user gave (Parquet, CSV or JSON Lines) in record batches, so memory stays one batch deep.

The format is told by the file name: .parquet/.pq, .csv (also .csv.gz, .csv.bz2), .jsonl/.ndjson
(also compressed). Every column asked for comes back; text columns as binary where the format
allows it (CSV: bytes exactly as stored, so the caller can decode them leniently), the others as
strings (numbers become their text: label 3 is the label "3").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from storage.errors import InputFormatError

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
BLOCK_BYTES = 8 << 20  # CSV/JSON bytes parsed per batch
PARQUET_BATCH_ROWS = 8192


def table_format(name: str | os.PathLike) -> str | None:
    """"parquet", "csv" or "jsonl" when the file name says the file is a table, else None."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in _COMPRESSED
    if compressed:
        suffixes = suffixes[:-1]
    kind = _FORMATS.get(suffixes[-1]) if suffixes else None
    return None if kind == "parquet" and compressed else kind  # Parquet compresses inside the file


def iter_table(path: str | os.PathLike, columns: Sequence[str], binary: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """Record batches holding `columns` (in that order) of the table at `path`.

    Columns in `binary` come as binary (CSV) or string (Parquet string, JSON), all others as string.
    InputFormatError names the file and the missing column or the parse error.
    """
    path = Path(path)
    kind = table_format(path)
    if kind is None:
        raise InputFormatError(f"{path}: not a table file (expected .parquet, .csv or .jsonl, optionally compressed)")
    try:
        batches = {"parquet": _parquet, "csv": _csv, "jsonl": _jsonl}[kind](path, list(columns), set(binary))
        for batch in batches:
            yield _as_strings(path, batch, list(columns), set(binary))
    except (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InputFormatError(f"{path}: {str(exc).strip()}") from None


def _missing(path: Path, have: Sequence[str], want: Sequence[str]) -> None:
    absent = [c for c in want if c not in have]
    if absent:
        raise InputFormatError(f"{path}: no column {absent[0]!r}; the columns are {list(have)}")


def _parquet(path: Path, columns: list[str], binary: set[str]) -> Iterator[pa.RecordBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    _missing(path, parquet.schema_arrow.names, columns)
    yield from parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)


def _csv(path: Path, columns: list[str], binary: set[str]) -> Iterator[pa.RecordBatch]:
    bad_rows: list[str] = []

    def invalid_row(row) -> str:
        bad_rows.append(f"row {row.number}: expected {row.expected_columns} columns, got {row.actual_columns}")
        return "error"

    header = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16)).schema.names
    _missing(path, header, columns)
    reader = pcsv.open_csv(
        path,
        read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES),
        parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid_row),
        convert_options=pcsv.ConvertOptions(
            include_columns=columns, strings_can_be_null=False,
            column_types={c: pa.binary() if c in binary else pa.string() for c in columns},
        ),
    )
    try:
        yield from reader
    except pa.ArrowInvalid as exc:
        raise InputFormatError(f"{path}: {bad_rows[0] if bad_rows else str(exc).strip()}") from None


def _jsonl(path: Path, columns: list[str], binary: set[str]) -> Iterator[pa.RecordBatch]:
    reader = pjson.open_json(path, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES))
    _missing(path, reader.schema.names, columns)
    for batch in reader:
        yield batch.select(columns)


def _as_strings(path: Path, batch: pa.RecordBatch, columns: list[str], binary: set[str]) -> pa.RecordBatch:
    arrays = []
    for name in columns:
        array = batch.column(name)
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if name in binary and (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
            array = array.cast(pa.binary())
        elif not pa.types.is_string(array.type):
            try:
                array = pc.cast(array, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputFormatError(f"{path}: column {name!r} is {array.type}, which does not read as text") from None
        arrays.append(array)
    return pa.record_batch(arrays, names=columns)
