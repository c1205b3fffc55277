"""Arrow schemas of every Parquet artifact, checked on write and on read."""

import pyarrow as pa

from storage.errors import SchemaMismatch

DOCUMENTS = pa.schema(
    [
        ("doc_id", pa.string()),  # stable: "<split>/<group>/<file name>" from the archive
        ("group", pa.string()),
        ("label", pa.int16()),  # index of group in the sorted list of groups
        ("split", pa.string()),  # "train" | "test"
        ("text", pa.string()),
    ]
)

VOCAB = pa.schema([("token", pa.string()), ("id", pa.int32()), ("count", pa.int64())])

SEQUENCES = pa.schema(
    [
        ("doc_id", pa.string()),
        ("label", pa.int16()),
        ("split", pa.string()),
        ("ids", pa.list_(pa.int32())),
        ("length", pa.int32()),  # token count before any truncation
    ]
)


def vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([("word", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise SchemaMismatch naming the first field that differs (no silent casts)."""
    if actual.equals(expected, check_metadata=False):
        return
    want = {f.name: f.type for f in expected}
    have = {f.name: f.type for f in actual}
    for name, typ in want.items():
        if name not in have:
            raise SchemaMismatch(f"{where}: missing field {name!r} ({typ})")
        if have[name] != typ:
            raise SchemaMismatch(f"{where}: field {name!r} is {have[name]}, expected {typ}")
    extra = sorted(set(have) - set(want))
    raise SchemaMismatch(f"{where}: unexpected fields {extra} (expected {expected.names})")
