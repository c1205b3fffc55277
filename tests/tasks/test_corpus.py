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
    files = {"t-train/a/1": "café".encode(), "t-train/a/2": "café".encode("latin-1"),
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


# -- hostile archives: odd member names, a huge member ------------------------------------------------
def test_non_utf8_and_control_characters_in_member_names_become_escaped_ids(home, tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:  # names kept as raw bytes
        for raw in (b"c/a/caf\xe9", b"c/a/two\nlines", b"c/gr\xfcn/\x1b[2J", b"c/gr\xfcn/ok"):
            info = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
            info.size = 4
            tar.addfile(info, io.BytesIO(b"text"))
    archive = download.fn(Source(url=str(path)), data_home=home)
    ref = corpus.fn(CorpusConfig(test_fraction=0.5), archive, data_home=home)
    table = ArtifactStore(home).read_parquet(ref, "documents.parquet", DOCUMENTS)
    names = sorted(d.split("/", 1)[1] for d in table.column("doc_id").to_pylist())
    assert names == ["a/caf%E9", "a/two%0Alines", "gr%FCn/%1B[2J", "gr%FCn/ok"]
    assert set(table.column("group").to_pylist()) == {"a", "gr%FCn"}


def test_a_document_over_max_document_bytes_is_cut_and_listed(home, tmp_path, caplog):
    files = {"c/a/long": "ab€".encode() * 10, "c/a/short": b"ok", "c/b/1": b"x", "c/b/2": b"y"}
    archive = download.fn(Source(url=str(make_tar(tmp_path / "news.tar.gz", files))), data_home=home)
    cfg = CorpusConfig(test_fraction=0.5, max_document_bytes=9)  # ends inside the 3-byte euro sign
    with caplog.at_level("WARNING"):
        ref = corpus.fn(cfg, archive, data_home=home)
    store = ArtifactStore(home)
    table = store.read_parquet(ref, "documents.parquet", DOCUMENTS)
    texts = {d.split("/", 1)[1]: t for d, t in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist())}
    assert texts["a/long"] == "ab€ab" and texts["a/short"] == "ok"  # the split euro sign dropped, not latin-1
    manifest = store.read_manifest(ref)
    long_id = next(d for d in table.column("doc_id").to_pylist() if d.endswith("/a/long"))
    assert manifest["truncated_documents"] == 1 and manifest["truncated_examples"] == {long_id: 50}
    assert manifest["max_document_bytes"] == 9 and manifest["latin1_fallbacks"] == 0
    assert f"{long_id} (50 bytes)" in caplog.text and "corpus.max_document_bytes=9" in caplog.text


_BIG_MEMBER_CHILD = r"""
import json, resource, sys
from storage.artifacts import ArtifactStore
from storage.schemas import DOCUMENTS
from tasks.config import CorpusConfig, Source
from tasks.corpus import corpus
from tasks.download import download
archive_path, home = sys.argv[1:]
archive = download.fn(Source(url=archive_path), data_home=home)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ref = corpus.fn(CorpusConfig(test_fraction=0.5), archive, data_home=home)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
store = ArtifactStore(home)
texts = store.read_parquet(ref, "documents.parquet", DOCUMENTS).column("text").to_pylist()
print(json.dumps({"peak_kib_before": before, "peak_kib_after": after, "lengths": sorted(len(t) for t in texts),
                  "truncated": store.read_manifest(ref)["truncated_examples"]}))
"""


class _Repeat(io.RawIOBase):
    """`size` bytes of a repeated word, produced as read (the test never holds them either)."""

    def __init__(self, size: int, word: bytes = b"spam "):
        self.left, self.block = size, word * (1 << 16)

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left, len(self.block))
        buffer[:n] = self.block[:n]
        self.left -= n
        return n


def test_a_200_mb_member_is_cut_at_the_limit_in_bounded_memory(home, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    size = 200 * 1024**2
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, length in (("c/a/huge", size), ("c/a/1", 5), ("c/b/1", 5), ("c/b/2", 5)):
            info = tarfile.TarInfo(name)
            info.size = length
            tar.addfile(info, io.BufferedReader(_Repeat(length)))
    assert path.stat().st_size < 5 * 1024**2
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run([sys.executable, "-c", _BIG_MEMBER_CHILD, str(path), home], capture_output=True, text=True,
                          timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["lengths"] == [5, 5, 5, 1024**2]  # the huge document cut at the default max_document_bytes (1 MiB)
    assert list(got["truncated"].values()) == [size]
    growth_mib = (got["peak_kib_after"] - got["peak_kib_before"]) / 1024
    assert growth_mib < 150, f"the corpus step raised the peak RSS by {growth_mib:.0f} MiB for a {size >> 20} MiB member"


def test_the_corpus_task_reads_an_unpinned_table_download(home, tmp_path):
    source = Source(url=write_table(tmp_path / "export.jsonl", ROWS).as_uri())
    archive = download.fn(source, data_home=home)
    ref = corpus.fn(TABLE_CFG, archive, data_home=home)
    manifest = ArtifactStore(home).read_manifest(ref)
    assert ref.rows == len(ROWS) and manifest["layout"] == "table" and manifest["documents"] == {"train": 4, "test": 2}
