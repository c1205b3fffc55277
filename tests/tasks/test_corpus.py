"""tasks.corpus and tasks.corpus_layout: layouts, tables, decoding, stripping, splits, row groups, the task via .fn."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import tasks.corpus as corpus_module
from storage.artifacts import ArtifactStore
from storage.errors import InputFormatError
from storage.files import Staging
from storage.schemas import DOCUMENTS
from tasks.config import CorpusConfig, Source
from tasks.corpus import build_documents, clean_text, corpus, strip_footer, strip_headers, strip_quotes
from tasks.corpus_layout import find_layout
from tasks.download import download

MESSAGE = (
    "From: a@b.c\nSubject: hello\n\n"
    "In article <1@x> bob@y.z writes:\n> quoted line\nMy own words.\n|bar quoted\nMore words.\n"
    "\n--\nAlice, alice@example.com\n"
)


def make_tar(path, files: dict[str, bytes], dirs=()):
    with tarfile.open(path, "w:gz") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- pure functions ----------------------------------------------------------------------------------
def test_strip_functions_match_sklearn_semantics():
    assert strip_headers(MESSAGE).startswith("In article")
    assert strip_headers("no blank line") == ""
    no_quotes = strip_quotes(MESSAGE)
    assert "quoted line" not in no_quotes and "writes:" not in no_quotes and "bar quoted" not in no_quotes
    assert "My own words." in no_quotes
    footerless = strip_footer(MESSAGE)
    assert "Alice" not in footerless and footerless.endswith("More words.\n")
    assert strip_footer("just text") == "just text"
    cleaned = clean_text(MESSAGE, ("quotes", "headers", "footers"))
    assert cleaned == "My own words.\nMore words.\n"
    assert clean_text(MESSAGE, ()) == MESSAGE


def docs_of(layout) -> list[tuple]:
    return sorted((d["split"], d["group"], d["name"]) for d in layout.documents.to_pylist())


def test_bydate_layout_with_and_without_top_folder():
    for top in ("", "20news-bydate/"):
        files = [f"{top}20news-bydate-train/b.grp/1", f"{top}20news-bydate-train/a.grp/2",
                 f"{top}20news-bydate-test/a.grp/3", f"{top}20news-bydate-test/b.grp/4"]
        layout = find_layout(files)
        assert layout.kind == "split" and layout.groups == ["a.grp", "b.grp"]
        assert docs_of(layout) == [("test", "a.grp", "3"), ("test", "b.grp", "4"), ("train", "a.grp", "2"),
                                   ("train", "b.grp", "1")]
        assert layout.documents["ordinal"].to_pylist() == [0, 1, 2, 3]  # positions in archive order


def test_folder_layout_ignores_stray_files_and_keeps_odd_names():
    files = ["20_newsgroup/README", "20_newsgroup/a/doc one.txt", "20_newsgroup/b/x-2", "20_newsgroup/b/.DS_Store",
             "20_newsgroup/b/nested/deep", "LICENSE"]
    layout = find_layout(files)
    assert layout.kind == "folders" and layout.groups == ["a", "b"]
    assert sorted(d["name"] for d in layout.documents.to_pylist()) == ["doc one.txt", "x-2"]
    assert layout.ignored == 4
    assert layout.ignored_examples == sorted(["20_newsgroup/README", "20_newsgroup/b/.DS_Store", "20_newsgroup/b/nested/deep",
                                              "LICENSE"])


def test_a_path_repeated_in_the_archive_is_one_document_with_the_last_content(tmp_path):
    with tarfile.open(tmp_path / "twice.tar", "w") as tar:
        for name, data in [("c/a/1", b"old"), ("c/b/2", b"b"), ("c/a/1", b"new"), ("c/a/3", b"a")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    table, _ = build(tmp_path, tmp_path / "twice.tar", CorpusConfig(test_fraction=0.5))
    assert sorted(zip(table["doc_id"].to_pylist(), table["text"].to_pylist()))[0][1] in ("new", "a", "b")
    assert sorted(table["text"].to_pylist()) == ["a", "b", "new"]


def test_empty_class_folder_is_an_error_naming_it():
    with pytest.raises(InputFormatError, match="'c/empty'"):
        find_layout(["c/a/1", "c/b/2"], dirs=["c", "c/a", "c/b", "c/empty"], archive="arc")


def test_train_and_test_with_different_classes_is_an_error():
    files = ["x-train/a/1", "x-train/b/2", "x-test/a/3", "x-test/c/4"]
    with pytest.raises(InputFormatError, match=r"only in train \['b'\], only in test \['c'\]"):
        find_layout(files)


def build(tmp_path, source, cfg: CorpusConfig | None = None):
    """documents.parquet built from `source` into a fresh staging directory: (table, stats)."""
    staging = tmp_path / f"staging-{len(list(tmp_path.glob('staging-*')))}"
    staging.mkdir()
    stats = build_documents(source, cfg or CorpusConfig(), Staging(staging))
    return pq.read_table(staging / "documents.parquet"), stats


def test_latin1_and_empty_documents_are_kept_and_counted(tmp_path):
    files = {"t-train/a/1": "café".encode("utf-8"), "t-train/a/2": "café".encode("latin-1"),
             "t-train/b/3": b"", "t-test/a/4": b"   \n", "t-test/b/5": b"ok"}
    table, stats = build(tmp_path, make_tar(tmp_path / "t.tar.gz", files))
    assert table.schema.equals(DOCUMENTS)
    texts = dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))
    assert texts["train/a/1"] == texts["train/a/2"] == "café" and texts["train/b/3"] == ""
    assert stats["latin1_fallbacks"] == 1 and stats["empty_documents"] == 2
    assert stats["label_map"] == {"a": 0, "b": 1} and stats["documents"] == {"train": 3, "test": 2}
    assert table.column("doc_id").to_pylist() == ["test/a/4", "test/b/5", "train/a/1", "train/a/2", "train/b/3"]


def test_stratified_split_is_seeded_deterministic_and_stratified(tmp_path):
    files = {f"c/{g}/{i}": f"{g} {i}".encode() for g in ("a", "b", "c") for i in range(10)}
    cfg = CorpusConfig(test_fraction=0.2, seed=7)
    one, stats = build(tmp_path, make_tar(tmp_path / "one.tar.gz", files), cfg)
    two, _ = build(tmp_path, make_tar(tmp_path / "two.tar.gz", dict(reversed(files.items()))), cfg)
    assert one.equals(two)
    assert stats["per_group"] == {g: {"train": 8, "test": 2} for g in ("a", "b", "c")}
    other, _ = build(tmp_path, make_tar(tmp_path / "one.tar.gz", files), cfg.model_copy(update={"seed": 8}))
    assert one.column("doc_id").to_pylist() != other.column("doc_id").to_pylist()


def test_row_groups_gathered_from_the_spill_in_any_archive_order(tmp_path, monkeypatch):
    """Small row groups and spill batches, members in shuffled order: the same table as one row group."""
    rng = np.random.default_rng(3)
    files = {f"n-{s}/{g}/{i}": (f"{g} {i} " * int(rng.integers(1, 30))).encode() for s in ("train", "test")
             for g in ("x", "y", "z") for i in range(40)}
    names = list(files)
    shuffled = {names[i]: files[names[i]] for i in rng.permutation(len(names))}
    whole, _ = build(tmp_path, make_tar(tmp_path / "sorted.tar.gz", files))
    monkeypatch.setattr(corpus_module, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(corpus_module, "ROW_GROUP_BYTES", 300)
    monkeypatch.setattr(corpus_module, "_SPILL_ROWS", 5)
    staging = tmp_path / "small"
    staging.mkdir()
    build_documents(make_tar(tmp_path / "shuffled.tar.gz", shuffled), CorpusConfig(), Staging(staging))
    parquet = pq.ParquetFile(staging / "documents.parquet")
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert parquet.num_row_groups > 240 / 7 and max(sizes) <= 7
    assert parquet.read().equals(whole)


# -- tables: Parquet, CSV, JSON Lines ----------------------------------------------------------------------
ROWS = [("Sci Fi", "train", "rockets and orbits"), ("Sci Fi", "train", ""), ("Cooking", "TRAIN", "bread, salt"),
        ("Cooking", "test", "ovens"), ("Sci Fi", "Test", "moon"), ("Cooking", "train", "soup")]
TABLE_CFG = CorpusConfig(text_column="Body Text", label_column="Category", split_column="Fold")


def write_table(path, rows, text_bytes=None):
    """The rows as Parquet, CSV or JSON Lines (by extension), with unusual column names."""
    table = pa.table({"Category": [r[0] for r in rows], "Fold": [r[1] for r in rows], "Body Text": [r[2] for r in rows],
                      "unused": list(range(len(rows)))})
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_a_table_corpus_with_its_own_column_names(tmp_path, suffix):
    table, stats = build(tmp_path, write_table(tmp_path / f"corpus{suffix}", ROWS), TABLE_CFG)
    assert stats["layout"] == "table" and stats["groups"] == ["Cooking", "Sci Fi"] and stats["split_source"] == "table"
    assert table.select(["doc_id", "label", "split", "text"]).to_pylist() == [
        {"doc_id": "test/Cooking/4", "label": 0, "split": "test", "text": "ovens"},
        {"doc_id": "test/Sci Fi/5", "label": 1, "split": "test", "text": "moon"},
        {"doc_id": "train/Cooking/3", "label": 0, "split": "train", "text": "bread, salt"},
        {"doc_id": "train/Cooking/6", "label": 0, "split": "train", "text": "soup"},
        {"doc_id": "train/Sci Fi/1", "label": 1, "split": "train", "text": "rockets and orbits"},
        {"doc_id": "train/Sci Fi/2", "label": 1, "split": "train", "text": ""},
    ]
    assert stats["empty_documents"] == 1


def test_a_table_without_a_split_column_gets_the_stratified_split(tmp_path):
    rows = [(f"g{i % 3}", "", f"text {i}") for i in range(30)]
    cfg = TABLE_CFG.model_copy(update={"split_column": None, "test_fraction": 0.2})
    table, stats = build(tmp_path, write_table(tmp_path / "c.parquet", rows), cfg)
    assert stats["per_group"] == {g: {"train": 8, "test": 2} for g in ("g0", "g1", "g2")}
    assert stats["split_source"].startswith("stratified")


def test_a_csv_document_that_is_not_utf8_falls_back_to_latin1(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"Category,Fold,Body Text\nA,train,caf\xe9\nB,train,ok\nA,test,\nB,test,\"two\nlines\"\n")
    table, stats = build(tmp_path, path, TABLE_CFG)
    assert table["text"].to_pylist() == ["", "two\nlines", "café", "ok"]
    assert stats["latin1_fallbacks"] == 1 and stats["empty_documents"] == 1


@pytest.mark.parametrize("rows, cfg, message", [
    ([("a", "train", "x"), ("b", "train", "y"), ("c", "test", "z")], TABLE_CFG,
     r"label 'c' \(first at row 3\) appears only in the test split"),
    ([("a", "train", "x"), ("b", "dev", "y")], TABLE_CFG, r"row 2 has split 'dev'"),
    ([("a", "train", "x"), ("", "train", "y")], TABLE_CFG, r"row 2 has an empty label"),
    ([("a", "train", "x"), ("b", "test", "y")], TABLE_CFG.model_copy(update={"label_column": "Topic"}),
     r"no column 'Topic'; the columns are \['Category', 'Fold', 'Body Text', 'unused'\]"),
])
def test_bad_tables_fail_with_a_message_naming_the_file_and_row(tmp_path, rows, cfg, message):
    path = write_table(tmp_path / "bad.csv", rows)
    with pytest.raises(InputFormatError, match=rf"bad\.csv: {message}"):
        build(tmp_path, path, cfg)


# -- the task ----------------------------------------------------------------------------------------
def test_corpus_task_with_stripping_and_cache(home, tmp_path):
    files = {"20news-bydate-train/sci.space/1": MESSAGE.encode(), "20news-bydate-train/rec.autos/2": b"cars",
             "20news-bydate-test/sci.space/3": b"orbit", "20news-bydate-test/rec.autos/4": "m\xe4chtig".encode("latin-1")}
    archive = download.fn(Source(url=str(make_tar(tmp_path / "news.tar.gz", files))), data_home=home)
    cfg = CorpusConfig(strip=("headers", "footers", "quotes"))
    ref = corpus.fn(cfg, archive, data_home=home)
    store = ArtifactStore(home)
    table = store.read_parquet(ref, "documents.parquet", DOCUMENTS)
    assert ref.rows == 4 and table.num_rows == 4
    row = table.filter(table.column("doc_id").to_numpy(zero_copy_only=False) == "train/sci.space/1").to_pylist()[0]
    assert row == {"doc_id": "train/sci.space/1", "group": "sci.space", "label": 1, "split": "train",
                   "text": "My own words.\nMore words.\n"}
    manifest = store.read_manifest(ref)
    assert manifest["label_map"] == {"rec.autos": 0, "sci.space": 1} and manifest["latin1_fallbacks"] == 1
    assert manifest["upstream"][0]["key"] == archive.key
    mtime = (store.local_dir(ref) / "documents.parquet").stat().st_mtime_ns
    assert corpus.fn(cfg, archive, data_home=home) == ref
    assert (store.local_dir(ref) / "documents.parquet").stat().st_mtime_ns == mtime  # not rebuilt
    assert pq.read_metadata(store.local_dir(ref) / "documents.parquet").num_rows == 4


def test_corpus_rejects_an_unsafe_archive(home, tmp_path):
    files = {"c/a/1": b"x", "c/b/2": b"y", "../evil": b"z"}
    archive = download.fn(Source(url=str(make_tar(tmp_path / "bad.tar.gz", files))), data_home=home)
    from storage.errors import UnsafeArchiveError

    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil"):
        corpus.fn(CorpusConfig(), archive, data_home=home)
    assert [m["step"] for m in ArtifactStore(home).list()] == ["download"]


def test_the_corpus_task_reads_an_unpinned_table_download(home, tmp_path):
    source = Source(url=write_table(tmp_path / "export.jsonl", ROWS).as_uri())
    archive = download.fn(source, data_home=home)
    ref = corpus.fn(TABLE_CFG, archive, data_home=home)
    manifest = ArtifactStore(home).read_manifest(ref)
    assert ref.rows == len(ROWS) and manifest["layout"] == "table" and manifest["documents"] == {"train": 4, "test": 2}
