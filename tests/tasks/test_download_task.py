"""tasks.download via .fn: pinned and unpinned sources, caching without network, re-download of bad copies."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

import storage.download as dl
from storage.artifacts import ArtifactStore
from storage.download import forget_download
from storage.errors import ChecksumMismatch, NotAnArchive, SourceUnreachable
from tasks.config import Source
from tasks.download import download, download_key
from tasks.step import is_transient
from tests.storage._http_server import PAYLOAD, SHA, Server, closed_port_url, full

ARCHIVE = gzip.compress(PAYLOAD, mtime=0)  # what an unpinned source must serve: an archive
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(dl, "sleep", lambda s: None)


def test_pinned_source_is_cached_without_network(home):
    with Server([full]) as srv:
        source = Source(url=srv.url, sha256=SHA, filename="data.bin")
        assert download_key(source, ArtifactStore(home)) == SHA
        ref = download.fn(source, data_home=home)
        again = download.fn(source, data_home=home)
    assert ref == again and ref.key == SHA and len(srv.log) == 1
    assert (Path(ref.uri) / "data.bin").read_bytes() == PAYLOAD
    manifest = ArtifactStore(home).read_manifest(ref)
    assert manifest["sha256"] == SHA and manifest["url"] == srv.url and manifest["pinned"] is True
    assert not list((Path(home) / "download").glob(".work-*"))


def test_unpinned_source_records_sha_and_second_run_does_not_download(home):
    with Server([full], body=ARCHIVE) as srv:
        source = Source(url=srv.url)
        assert download_key(source, ArtifactStore(home)) is None
        ref = download.fn(source, data_home=home)
        assert download_key(source, ArtifactStore(home)) == ARCHIVE_SHA and ref.key == ARCHIVE_SHA
        assert download.fn(source, data_home=home) == ref
    assert len(srv.log) == 1
    manifest = ArtifactStore(home).read_manifest(ref)
    assert manifest["pinned"] is False and manifest["sha256"] == ARCHIVE_SHA
    index = json.loads(next((Path(home) / ".urls").glob("*.json")).read_text())
    assert index == {"url": srv.url, "sha256": ARCHIVE_SHA}


def test_cached_file_with_wrong_size_is_downloaded_again(home):
    with Server([full]) as srv:
        source = Source(url=srv.url, sha256=SHA)
        ref = download.fn(source, data_home=home)
        (Path(ref.uri) / source.name).write_bytes(PAYLOAD[:100])
        again = download.fn(source, data_home=home)
    assert len(srv.log) == 2 and (Path(again.uri) / source.name).read_bytes() == PAYLOAD


def test_checksum_mismatch_caches_nothing_and_next_run_downloads_again(home):
    with Server([full], body=b"an error page") as srv:
        source = Source(url=srv.url, sha256=SHA)
        for _ in range(2):
            with pytest.raises(ChecksumMismatch):
                download.fn(source, data_home=home)
    assert len(srv.log) == 2 and ArtifactStore(home).list() == []


def test_file_url_and_plain_path_sources(home, tmp_path):
    src = tmp_path / "archive.tar.gz"
    payload = gzip.compress(b"payload", mtime=0)  # unpinned: it must be the gzip its name promises
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    a = download.fn(Source(url=src.as_uri()), data_home=home)
    b = download.fn(Source(url=str(src), sha256=sha), data_home=home)
    assert a.key == b.key == sha and (Path(a.uri) / "archive.tar.gz").read_bytes() == payload


def html_page(h, s):
    """200 with a login page instead of the file (a captive portal, a moved file, a bad link)."""
    body = b"<!DOCTYPE html>\n<html><body>Please sign in\x1b[31m</body></html>"
    h.send_response(200)
    h.send_header("Content-Type", "text/html")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def test_unpinned_url_serving_html_records_nothing_and_the_fixed_url_then_succeeds(home):
    with Server([html_page, full], body=ARCHIVE) as srv:
        source = Source(url=srv.url, filename="news.tar.gz")
        with pytest.raises(NotAnArchive) as err:
            download.fn(source, data_home=home)
        message = str(err.value)
        assert f"{srv.url} served something that is not a gzip archive but an HTML page" in message
        assert r"<!DOCTYPE html>\n<html>" in message and "\x1b" not in message  # shown, escaped
        assert download_key(source, ArtifactStore(home)) is None and ArtifactStore(home).list() == []
        assert not list((Path(home) / "download").glob(".urls/*.json"))
        ref = download.fn(source, data_home=home)  # the server was fixed
    assert ref.key == ARCHIVE_SHA == download_key(source, ArtifactStore(home)) and len(srv.log) == 2
    assert (Path(ref.uri) / "news.tar.gz").read_bytes() == ARCHIVE


def test_forget_download_makes_the_next_run_fetch_an_unpinned_url_again(home):
    with Server([full], body=ARCHIVE) as srv:
        source = Source(url=srv.url, filename="data.tar.gz")
        ref = download.fn(source, data_home=home)
        assert forget_download(ref, home) is True and download_key(source, ArtifactStore(home)) is None
        assert forget_download(ref, home) is False  # nothing left to forget
        assert download.fn(source, data_home=home) == ref and len(srv.log) == 2
        assert download_key(source, ArtifactStore(home)) == ARCHIVE_SHA
        assert ArtifactStore(home).forget_url(srv.url) is True and download_key(source, ArtifactStore(home)) is None
        pinned = download.fn(Source(url=srv.url, sha256=ARCHIVE_SHA, filename="data.tar.gz"), data_home=home)
    assert forget_download(pinned, home) is False  # a pinned source has no record to drop


def test_unreachable_source_fails_fast_and_is_not_retried_by_prefect(home):
    url = closed_port_url()
    with pytest.raises(SourceUnreachable, match="Quickstart on local copies of the data") as err:
        download.fn(Source(url=url, mirrors=("http://nonexistent.invalid/x.zip",)), data_home=home)
    assert url in str(err.value) and "nonexistent.invalid" in str(err.value)
    assert not is_transient(err.value) and ArtifactStore(home).list() == []
