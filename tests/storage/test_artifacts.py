"""storage.artifacts: atomic publish, manifests, crash and concurrency safety, schema checks."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifacts import ArtifactStore, artifact_key
from storage.errors import SchemaMismatch
from storage.files import Staging
from storage.schemas import VOCAB

ROOT = Path(__file__).resolve().parents[2]


def vocab_table(n=3):
    return pa.table({"token": [f"w{i}" for i in range(n)], "id": pa.array(range(1, n + 1), pa.int32()),
                     "count": pa.array([10] * n, pa.int64())}, schema=VOCAB)


def build_vocab(staging: Staging) -> dict:
    rows = staging.write_parquet("vocab.parquet", vocab_table(), VOCAB)
    (staging.path("note.txt")).write_text("hello")
    return {"rows": rows, "stats": {"answer": 42}}


def trusted(home: str) -> list[str]:
    return [f"{m['step']}/{m['key']}" for m in ArtifactStore(home).list()]


def test_publish_find_and_manifest(home):
    store = ArtifactStore(home)
    key = artifact_key("tokens", 1, {"n": 3})
    assert store.find("tokens", key) is None
    ref = store.publish("tokens", key, build_vocab, version=1, params={"n": 3})
    assert ref == store.find("tokens", key) and ref.rows == 3 and ref.uri == f"{home}/tokens/{key}"
    manifest = store.read_manifest(ref)
    assert manifest["step"] == "tokens" and manifest["key"] == key and manifest["params"] == {"n": 3}
    assert manifest["stats"] == {"answer": 42} and manifest["rows"] == 3
    assert set(manifest["files"]) == {"vocab.parquet", "note.txt"}
    assert manifest["files"]["vocab.parquet"]["rows"] == 3 and len(manifest["files"]["note.txt"]["sha256"]) == 64
    assert "pyarrow" in manifest["libraries"]
    assert store.read_parquet(ref, "vocab.parquet", VOCAB).equals(vocab_table())
    assert store.find("tokens", key, verify=True) == ref


def test_failed_build_leaves_nothing_and_next_publish_works(home):
    store = ArtifactStore(home)

    def broken(staging: Staging):
        (staging.path("vocab.parquet")).write_bytes(b"half a file")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.publish("tokens", "k1", broken, version=1, params={})
    assert store.find("tokens", "k1") is None and trusted(home) == []
    assert [p.name for p in (Path(home) / "tokens").iterdir()] == []  # staging removed
    assert store.publish("tokens", "k1", build_vocab, version=1, params={}).rows == 3


def test_sigkill_during_build_leaves_nothing_trusted(home):
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from storage.artifacts import ArtifactStore
        def build(staging):
            (staging.path("vocab.parquet")).write_bytes(b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        ArtifactStore({home!r}).publish("tokens", "k1", build, version=1, params={{}})
    """)
    proc = subprocess.run([sys.executable, "-c", child], timeout=60)
    assert proc.returncode == -9
    store = ArtifactStore(home)
    assert store.find("tokens", "k1") is None and trusted(home) == []
    assert list((Path(home) / "tokens").glob(".tmp-k1-*"))  # the torn staging dir is left behind...
    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})  # ...and cleaned by the next publish
    assert ref.rows == 3 and not list((Path(home) / "tokens").glob(".tmp-k1-*"))


def _publish_slowly(home: str, counter: str) -> dict:
    def build(staging: Staging) -> dict:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # both processes are inside publish at once
        return build_vocab(staging)

    return ArtifactStore(home).publish("tokens", "same", build, version=1, params={}).model_dump()


def test_two_processes_publish_the_same_artifact_once(home, tmp_path):
    counter = tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_publish_slowly, [(home, str(counter)), (home, str(counter))])
    assert results[0] == results[1] and results[0]["rows"] == 3
    assert counter.read_text() == "built\n"
    assert ArtifactStore(home).find("tokens", "same", verify=True) is not None


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    """Invert one byte in the middle of a file (same size); optionally set its mtime back as it was."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def quarantined(home: str, step: str) -> list[str]:
    return sorted(p.name for p in (Path(home) / step / ".quarantine").glob("*"))


@pytest.fixture
def warnings_logged():
    """Messages of the warnings the store logs (on the CLI's progress logger, whatever its propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("newsgroups_lstm.progress")
    logger.addHandler(handler)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)


def test_a_changed_file_is_moved_to_quarantine_and_rebuilt(home, warnings_logged):
    store = ArtifactStore(home)
    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})
    note = store.local_dir(ref) / "note.txt"
    note.write_text("hello, tampered")
    assert store.find("tokens", "k1") is None
    [warning] = warnings_logged().splitlines()  # one line naming the file
    assert "tokens/k1 is damaged" in warning and str(note) in warning
    [moved] = quarantined(home, "tokens")
    assert moved.startswith("k1-") and (Path(home) / "tokens/.quarantine" / moved / "note.txt").read_text() == \
        "hello, tampered"  # set aside, not deleted
    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})  # rebuilt in place of the bad one
    assert (store.local_dir(ref) / "note.txt").read_text() == "hello"


def test_same_size_change_is_found_without_rehashing_unchanged_files(home):
    from storage.integrity import STATS

    store = ArtifactStore(home)
    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})
    hashed = STATS.hashed_bytes
    assert store.find("tokens", "k1") == ref and store.read_parquet(ref, "vocab.parquet", VOCAB).num_rows == 3
    assert STATS.hashed_bytes == hashed  # stamped at publish: an unchanged file is not hashed again

    flip_byte(store.local_dir(ref) / "note.txt", keep_mtime=True)  # its ctime still changes
    assert store.find("tokens", "k1") is None and len(quarantined(home, "tokens")) == 1
    assert STATS.hashed_bytes > hashed

    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})
    assert store.find("tokens", "k1", verify=True) == ref  # verify=True re-hashes whatever the stamps say


def test_a_file_damaged_after_the_check_is_never_read(home):
    from storage.errors import DamagedArtifact

    store = ArtifactStore(home)
    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})
    assert store.find("tokens", "k1") == ref
    flip_byte(store.local_dir(ref) / "vocab.parquet")
    with pytest.raises(DamagedArtifact, match="vocab.parquet has sha256"):
        store.read_parquet(ref, "vocab.parquet", VOCAB)
    assert store.find("tokens", "k1") is None and len(quarantined(home, "tokens")) == 1


def test_read_parquet_refuses_a_wrong_schema(home):
    store = ArtifactStore(home)

    def build(staging: Staging):
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"token": ["a"], "id": pa.array([1], pa.int64()), "count": pa.array([1], pa.int64())}),
                       staging.path("vocab.parquet"))

    ref = store.publish("tokens", "k1", build, version=1, params={})
    with pytest.raises(SchemaMismatch, match="'id'"):
        store.read_parquet(ref, "vocab.parquet", VOCAB)
    with pytest.raises(SchemaMismatch):
        Staging(Path(home)).write_parquet("x.parquet", pa.table({"token": ["a"]}), VOCAB)


def test_manifest_is_json_and_missing_manifest_means_absent(home):
    store = ArtifactStore(home)
    ref = store.publish("tokens", "k1", build_vocab, version=1, params={})
    path = store.local_dir(ref) / "manifest.json"
    assert json.loads(path.read_text())["key"] == "k1"
    path.unlink()
    assert store.find("tokens", "k1") is None


@pytest.mark.usefixtures("prefect_api")
def test_a_flipped_byte_in_each_kind_of_artifact_is_quarantined_and_rebuilt(tiny_config, capsys, warnings_logged):
    from flows.cli import EXIT_FAILED, EXIT_OK, main
    from flows.pipeline import pipeline

    home = tiny_config.data_home
    first = pipeline(tiny_config)
    steps = first["steps"]
    flipped = {"download-corpus": "tiny-news.tar.gz", "corpus": "documents.parquet", "glove": "vectors.parquet",
               "tokens": "sequences.parquet", "embeddings": "matrix.npy", "train": "model.keras"}
    for name, file in flipped.items():
        flip_byte(Path(steps[name]["uri"]) / file, keep_mtime=name == "corpus")

    second = pipeline(tiny_config)
    rebuilt = {name for name, step in second["steps"].items() if step["state"] == "Completed"}
    assert rebuilt == set(flipped)  # evaluate and the GloVe download stay Cached: same keys
    assert second["artifacts"] == first["artifacts"]
    for step in {step["step"] for step in steps.values()}:  # each damaged artifact set aside, nothing else
        moved = sorted(name.rsplit("-", 1)[0] for name in quarantined(home, step))  # <key>-<time>
        assert moved == sorted(steps[n]["key"] for n in flipped if steps[n]["step"] == step), step
    warned = warnings_logged()
    assert all(f"{steps[name]['step']}/{steps[name]['key']} is damaged: " in warned for name in flipped), warned
    capsys.readouterr()

    # `verify` re-hashes everything: all sound now; after another flip it names the file and exits 1.
    assert main(["verify", "--data-home", home]) == EXIT_OK
    assert "8 artifacts" in capsys.readouterr().out
    flip_byte(Path(steps["evaluate"]["uri"]) / "metrics.json")
    assert main(["verify", "evaluate", "--data-home", home]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert f"DAMAGED evaluate/{steps['evaluate']['key']}: " in out and "metrics.json has sha256" in out
    assert main(["verify", "--data-home", home]) == EXIT_OK  # the damaged one was moved aside
    assert ArtifactStore(home).find("evaluate", steps["evaluate"]["key"]) is None
