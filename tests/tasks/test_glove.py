"""tasks.glove: Arrow parse of a tiny GloVe zip, malformed lines with line numbers, the task via .fn."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from storage.artifacts import ArtifactStore
from storage.errors import InputFormatError
from storage.schemas import vectors_schema
from tasks.config import GloveConfig, Source
from tasks.download import download
from tasks.glove import glove, parse_vectors, read_glove_zip

DIM = 50
GOOD = [f"{w} " + " ".join(f"{(i + j) / 100:.5f}" for j in range(DIM)) for i, w in enumerate(["the", ",", "null", "nan", "n/a", '"quoted'])]


def parse(lines, dim=DIM):
    return parse_vectors(io.BytesIO(("\n".join(lines) + "\n").encode()), dim, "glove.txt")


def make_zip(path, lines, member=f"glove.6B.{DIM}d.txt"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, "\n".join(lines) + "\n")
    return path


def test_parses_words_that_look_like_nulls_and_quotes():
    table, stats = parse(GOOD)
    assert table.schema.equals(vectors_schema(DIM))
    assert table.column("word").to_pylist() == ["the", ",", "null", "nan", "n/a", '"quoted']
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    assert vectors.shape == (6, DIM) and vectors.dtype == np.float32
    assert vectors[1, 2] == pytest.approx(0.03)
    assert stats["duplicate_words"] == 0 and stats["words"] == 6


def test_crlf_lines_parse():
    table, _ = parse_vectors(io.BytesIO(("\r\n".join(GOOD) + "\r\n").encode()), DIM, "g")
    assert table.num_rows == 6


@pytest.mark.parametrize(
    "line, message",
    [
        ("short " + " ".join(["0.1"] * (DIM - 1)), "line 3: expected a word and 50 values, got 49"),
        ("long " + " ".join(["0.1"] * (DIM + 1)), "line 3: expected a word and 50 values, got 51"),
        ("word abc " + " ".join(["0.1"] * (DIM - 1)), "line 3: 'abc' is not a number"),
        ("word nan " + " ".join(["0.1"] * (DIM - 1)), "line 3: value nan is not finite"),
        ("word " + " ".join(["0.1"] * (DIM - 1)) + " inf", "line 3: value inf is not finite"),
        ("", "line 3: expected a word and 50 values, got 0"),
    ],
    ids=["short", "long", "non-numeric", "nan", "inf", "empty-line"],
)
def test_malformed_line_names_member_and_line(line, message):
    with pytest.raises(InputFormatError, match=f"glove.txt, {message}"):
        parse([GOOD[0], GOOD[1], line, GOOD[2]])


def test_not_utf8_names_the_line():
    data = ("\n".join(GOOD[:2]) + "\n").encode() + b"caf\xe9 " + " ".join(["0.1"] * DIM).encode() + b"\n"
    with pytest.raises(InputFormatError, match="line 3: not UTF-8"):
        parse_vectors(io.BytesIO(data), DIM, "glove.txt")


def test_duplicate_words_keep_the_first_and_are_counted():
    dup = "the " + " ".join(["9.0"] * DIM)
    table, stats = parse([GOOD[0], GOOD[1], dup])
    assert table.column("word").to_pylist() == ["the", ","]
    assert table.column("vector")[0].values.to_numpy()[0] == pytest.approx(0.0)
    assert stats["duplicate_words"] == 1 and stats["duplicate_examples"] == ["the"]


def test_zip_member_errors(tmp_path):
    arc = make_zip(tmp_path / "g.zip", GOOD, member="glove.6B.100d.txt")
    with pytest.raises(InputFormatError, match=r"no member 'glove.6B.50d.txt'.*glove.6B.100d.txt"):
        read_glove_zip(arc, DIM)
    bad = make_zip(tmp_path / "b.zip", [GOOD[0], "x 1 2"])
    with pytest.raises(InputFormatError, match=r"b.zip:glove.6B.50d.txt, line 2"):
        read_glove_zip(bad, DIM)


def test_glove_task_and_cache(home, tmp_path):
    archive = download.fn(Source(url=str(make_zip(tmp_path / "glove.6B.zip", GOOD))), data_home=home)
    ref = glove.fn(GloveConfig(dim=DIM), archive, data_home=home)
    store = ArtifactStore(home)
    table = store.read_parquet(ref, "vectors.parquet", vectors_schema(DIM))
    assert ref.rows == 6 and table.column("word")[2].as_py() == "null"
    manifest = store.read_manifest(ref)
    assert manifest["member"] == "glove.6B.50d.txt" and manifest["duplicate_words"] == 0
    assert glove.fn(GloveConfig(dim=DIM), archive, data_home=home) == ref
