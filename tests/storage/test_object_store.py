"""An s3:// data home on a real S3-compatible server (moto_server): the pipeline, publishing races, errors.

Nothing is mocked in-process: the store talks HTTP to moto_server through pyarrow and boto3, and
the CLI runs as `python -m flows.cli` subprocesses with their own TMPDIR, PREFECT_HOME and object cache.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from storage.cache import ObjectCache
from storage.errors import StoreUnavailable
from storage.files import Staging
from tests.flows.conftest import REPO_ROOT, tiny_config_dict
from tests.servers import free_port

ALL_STEPS = {"download-glove", "download-corpus", "corpus", "glove", "tokens", "embeddings", "train", "evaluate"}


@pytest.fixture
def s3_home(s3_server, monkeypatch, tmp_path) -> str:
    """A fresh bucket's s3:// URI; this process talks to moto_server and has its own object cache."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSGROUPS_LSTM_CACHE_DIR", str(tmp_path / "cache"))
    return f"s3://{s3_server.create_bucket()}/home"


def objects(s3_server, uri: str) -> dict[str, int]:
    """Every object under an s3:// URI: key -> size (directory markers left out)."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}


def _write(staging: Staging, tag: str) -> dict:
    staging.path("data.bin").write_bytes(tag.encode() * 50_000)
    staging.path("tag.txt").write_text(tag)
    return {"rows": len(tag)}


def test_publish_then_find_read_and_list_from_another_host(s3_server, s3_home, tmp_path, monkeypatch):
    store = ArtifactStore(s3_home)
    store.check()
    ref = store.publish("tokens", "k1", lambda s: _write(s, "abc"), version=1, params={"n": 1})
    manifest = store.read_manifest(ref)
    attempt = manifest["attempt"]
    assert {n: m["object"] for n, m in manifest["files"].items()} == {"data.bin": f"{attempt}/data.bin",
                                                                      "tag.txt": f"{attempt}/tag.txt"}
    stored = objects(s3_server, s3_home)
    assert stored == {f"home/tokens/k1/{attempt}/data.bin": 150_000, f"home/tokens/k1/{attempt}/tag.txt": 3,
                      "home/tokens/k1/manifest.json": stored["home/tokens/k1/manifest.json"]}

    # Another host (own object cache): finds it, reads it through its cache, lists it.
    monkeypatch.setenv("NEWSGROUPS_LSTM_CACHE_DIR", str(tmp_path / "other-host"))
    other = ArtifactStore(s3_home)
    assert other.find("tokens", "k1", verify=True) == ref
    assert other.local_file(ref, "tag.txt").read_text() == "abc"
    assert sorted(p.name for p in other.local_dir(ref).iterdir()) == ["data.bin", "tag.txt"]
    assert [m["key"] for m in other.list()] == ["k1"] and other.resolve("tokens/k") == ref
    assert ObjectCache().size() == 150_003


def test_exact_bytes_round_trip_a_tar_gz_without_recompression(s3_server, s3_home):
    import gzip

    payload = gzip.compress(b"not to be unpacked" * 1000)
    store = ArtifactStore(s3_home)

    def build(staging: Staging) -> None:
        staging.path("corpus.tar.gz").write_bytes(payload)

    ref = store.publish("download", "x", build, version=1, params={})
    bucket, prefix = s3_home[len("s3://"):].split("/", 1)
    key = f"{prefix}/download/x/{store.read_manifest(ref)['files']['corpus.tar.gz']['object']}"
    assert s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read() == payload
    assert store.only_file(ref).read_bytes() == payload


def test_a_changed_object_is_never_used_and_its_artifact_is_quarantined(s3_server, s3_home, tmp_path, monkeypatch):
    store = ArtifactStore(s3_home)
    ref = store.publish("tokens", "k1", lambda s: _write(s, "abc"), version=1, params={})
    manifest = store.read_manifest(ref)
    bucket, prefix = s3_home[len("s3://"):].split("/", 1)
    # Same size, other bytes, read by a host that has no cached copy.
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/tokens/k1/{manifest['files']['tag.txt']['object']}",
                                  Body=b"xyz")
    monkeypatch.setenv("NEWSGROUPS_LSTM_CACHE_DIR", str(tmp_path / "other-host"))
    from storage.errors import DamagedArtifact

    reader = ArtifactStore(s3_home)
    with pytest.raises(DamagedArtifact, match="tag.txt.*sha256"):
        reader.local_file(ref, "tag.txt")
    assert reader.find("tokens", "k1") is None  # moved to quarantine, so the step will rebuild it
    assert any("/tokens/.quarantine/k1-" in key for key in objects(s3_server, s3_home))
    assert not any(key.startswith(f"{prefix}/tokens/k1/") for key in objects(s3_server, s3_home))

    ref = store.publish("tokens", "k1", lambda s: _write(s, "abc"), version=1, params={})
    data_object = store.read_manifest(ref)["files"]["data.bin"]["object"]
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/tokens/k1/{data_object}", Body=b"short")
    assert ArtifactStore(s3_home).find("tokens", "k1") is None  # a size change needs no download to be seen

    # Same size, other bytes, already in this host's cache: `verify` streams and hashes the objects themselves.
    ref = store.publish("tokens", "k2", lambda s: _write(s, "abc"), version=1, params={})
    assert store.local_file(ref, "tag.txt").read_text() == "abc"
    tag_object = store.read_manifest(ref)["files"]["tag.txt"]["object"]
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/tokens/k2/{tag_object}", Body=b"xyz")
    checked, damaged = ArtifactStore(s3_home).verify("tokens")
    assert checked == 1 and [(name, "tag.txt has sha256" in problem) for name, problem, _ in damaged] == [("tokens/k2", True)]
    assert ArtifactStore(s3_home).find("tokens", "k2") is None


def test_object_cache_is_capped_least_recently_used_and_rechecks_its_copies(tmp_path, monkeypatch):
    from storage import cache as cache_module

    monkeypatch.setattr(cache_module, "GRACE_S", 0.0)
    cache = ObjectCache(tmp_path / "cache", cap_bytes=250)
    fetched: list[str] = []

    def get(name: str, payload: bytes) -> Path:
        def fetch(dest: Path) -> str:
            fetched.append(name)
            dest.write_bytes(payload)
            return hashlib.sha256(payload).hexdigest()

        return cache.get(name, {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}, fetch)

    a = get("a.keras", b"a" * 100)
    assert a.name.endswith(".keras") and a.read_bytes() == b"a" * 100
    get("b.npy", b"b" * 100)
    time.sleep(0.05)
    get("a.keras", b"a" * 100)  # a hit: a is now more recently used than b
    time.sleep(0.05)
    get("c.json", b"c" * 100)  # 300 > 250 bytes: b, the least recently used, goes
    assert fetched == ["a.keras", "b.npy", "c.json"] and cache.size() == 200
    get("b.npy", b"b" * 100)
    assert fetched[-1] == "b.npy"

    flip = get("c.json", b"c" * 100)
    flip.write_bytes(b"C" * 100)  # a damaged copy is dropped and fetched again, never returned
    assert get("c.json", b"c" * 100).read_bytes() == b"c" * 100 and fetched[-1] == "c.json"

    from storage.integrity import Damaged

    def other_bytes(dest: Path) -> str:
        dest.write_bytes(b"xyz")
        return hashlib.sha256(b"xyz").hexdigest()

    with pytest.raises(Damaged, match="sha256"):  # bytes that do not match what was asked for never enter
        cache.get("d.bin", {"bytes": 3, "sha256": "0" * 64}, other_bytes)
    assert not list(cache.objects.glob("*/" + "0" * 64 + "*"))


def _race(uri: str, cache: str, tag: str, key: str, barrier: str) -> dict:
    """One "host" (its own object cache, so its own locks) publishing `key` with its own bytes."""
    os.environ["NEWSGROUPS_LSTM_CACHE_DIR"] = cache

    def build(staging: Staging) -> dict:
        extra = _write(staging, tag)
        Path(barrier, tag).touch()  # both hosts have built before either publishes
        deadline = time.monotonic() + 30
        while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return extra

    ref = ArtifactStore(uri).publish("race", key, build, version=1, params={})
    return {"ref": ref.model_dump(), "content": ArtifactStore(uri).local_file(ref, "tag.txt").read_text()}


def test_two_hosts_racing_to_publish_one_key_leave_one_consistent_artifact(s3_server, s3_home, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        for round_ in range(5):
            key, barrier = f"key{round_}", tmp_path / f"barrier{round_}"
            barrier.mkdir()
            results = pool.starmap(_race, [(s3_home, str(tmp_path / f"host-{tag}"), tag, key, str(barrier))
                                           for tag in ("aaa", "bbb")])
            assert results[0] == results[1]  # the loser returns the winner's artifact, and reads the winner's bytes
            store = ArtifactStore(s3_home)
            manifest = store.read_manifest("race", key)
            assert store.find("race", key, verify=True) is not None
            content = results[0]["content"]
            assert content in ("aaa", "bbb")
            assert hashlib.sha256(content.encode()).hexdigest() == manifest["files"]["tag.txt"]["sha256"]
            # Only the winner's attempt is left: the loser deleted its own files.
            stored = [k for k in objects(s3_server, s3_home) if f"/race/{key}/" in k]
            assert sorted(stored) == sorted([f"home/race/{key}/manifest.json"] +
                                            [f"home/race/{key}/{m['object']}" for m in manifest["files"].values()])
            assert store.local_file(store.find("race", key), "data.bin").read_bytes() == \
                content.encode() * 50_000


def test_misconfigured_object_store_fails_fast_naming_the_endpoint(s3_server, s3_home, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"{closed}.*unreachable.*AWS_ENDPOINT_URL"):
        ArtifactStore(s3_home).check()
    assert time.monotonic() - started < 10
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    with pytest.raises(StoreUnavailable, match="bucket no-such-bucket does not exist"):
        ArtifactStore("s3://no-such-bucket/home").check()


# -- the CLI end to end, one process per command --------------------------------------------------------

def _cli(args: list[str], env: dict, tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m flows.cli ...` as a fresh process with its own TMPDIR and PREFECT_HOME."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(env, TMPDIR=str(tmp), PREFECT_HOME=str(tmp / "prefect"))
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _recorded_gets(s3_server) -> list[str]:
    with urllib.request.urlopen(s3_server.endpoint_url + "/moto-api/recorder/download-recording", timeout=30) as r:
        entries = [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]
    return [e["url"].split("?")[0] for e in entries if e["method"] == "GET" and "list-type" not in e["url"]]


def _moto(s3_server, action: str) -> None:
    request = urllib.request.Request(f"{s3_server.endpoint_url}/moto-api/recorder/{action}", method="POST")
    urllib.request.urlopen(request, timeout=30).close()


def test_pipeline_inspect_and_predict_on_an_s3_home(s3_server, s3_home, tiny_sources, subprocess_env, tmp_path):
    env = dict(subprocess_env, **s3_server.env)
    env["NEWSGROUPS_LSTM_CACHE_DIR"] = str(tmp_path / "cache-a")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config_dict(tiny_sources, s3_home)))

    first = _cli(["run", "-c", str(config), "--until", "embeddings", "--json"], env, tmp_path / "p1")
    assert first.returncode == 0, first.stderr
    assert {s["state"] for s in json.loads(first.stdout)["steps"].values()} == {"Completed"}

    # Another host: fresh TMPDIR, PREFECT_HOME and object cache. Every step is Cached, and only manifests are read.
    _moto(s3_server, "reset-recording")
    _moto(s3_server, "start-recording")
    try:
        rerun = _cli(["run", "-c", str(config), "--until", "embeddings", "--json"],
                     dict(env, NEWSGROUPS_LSTM_CACHE_DIR=str(tmp_path / "cache-b")), tmp_path / "p2")
    finally:
        _moto(s3_server, "stop-recording")
    assert rerun.returncode == 0, rerun.stderr
    assert {s["state"] for s in json.loads(rerun.stdout)["steps"].values()} == {"Cached"}
    gets = _recorded_gets(s3_server)
    assert gets and all(url.endswith("/manifest.json") for url in gets), gets
    stored = objects(s3_server, s3_home)
    read = sum(stored[url.split("/", 4)[-1]] for url in gets)  # http://host:port/bucket/<key>
    print(f"cached rerun from a fresh host: {len(gets)} GETs, {read:,} bytes (manifests only) "
          f"of {sum(stored.values()):,} stored")
    assert not (tmp_path / "cache-b" / "objects").exists() or ObjectCache(tmp_path / "cache-b").size() == 0

    full = _cli(["run", "-c", str(config), "train.epochs=1", "--json"], env, tmp_path / "p3")
    assert full.returncode == 0, full.stderr
    summary = json.loads(full.stdout)
    assert set(summary["steps"]) == ALL_STEPS and summary["steps"]["train"]["state"] == "Completed"
    assert {summary["steps"][s]["state"] for s in ALL_STEPS - {"train", "evaluate"}} == {"Cached"}
    assert summary["artifacts"]["evaluate"]["uri"].startswith(s3_home)
    print(f"object cache after the full run: {ObjectCache(tmp_path / 'cache-a').size():,} bytes")

    elsewhere = dict(env, NEWSGROUPS_LSTM_CACHE_DIR=str(tmp_path / "cache-c"), NEWSGROUPS_LSTM_HOME=s3_home)
    lineage = _cli(["inspect", "--lineage", f"evaluate/{summary['artifacts']['evaluate']['key']}"], elsewhere,
                   tmp_path / "p4")
    assert lineage.returncode == 0, lineage.stderr
    assert "train/" in lineage.stdout and "└── download/" in lineage.stdout.replace("├── download/", "└── download/")

    predicted = _cli(["predict", "rocket launch orbit", "--json"], elsewhere, tmp_path / "p5")
    assert predicted.returncode == 0, predicted.stderr
    result = json.loads(predicted.stdout)
    assert result["run"] == f"train/{summary['artifacts']['train']['key']}"
    assert result["predictions"][0]["label"] in {"rec.autos", "sci.space", "talk.politics"}


def test_cli_with_an_unreachable_endpoint_exits_1_within_seconds(s3_server, subprocess_env, tmp_path, tiny_sources):
    closed = f"http://127.0.0.1:{free_port()}"
    env = dict(subprocess_env, **dict(s3_server.env, AWS_ENDPOINT_URL=closed))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config_dict(tiny_sources, "s3://some-bucket/home")))
    started = time.monotonic()
    done = _cli(["run", "-c", str(config)], env, tmp_path / "p")
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert closed in error and "AWS_ENDPOINT_URL" in error and "NEWSGROUPS_LSTM_HOME" in error, done.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
