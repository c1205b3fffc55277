"""storage.download against a real loopback HTTP server driven by a per-test script."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import storage.download as dl
from storage.errors import ChecksumMismatch, DownloadError, SourceUnreachable, TransientError
from tasks.common import is_transient

PAYLOAD = bytes(range(256)) * 800  # 204,800 bytes
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """ThreadingHTTPServer on 127.0.0.1; `script` is a list of behaviours, one per GET (last repeats)."""

    def __init__(self, script, body=PAYLOAD, etag='"v1"'):
        self.script, self.body, self.etag, self.log = list(script), body, etag, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append({"path": self.path, **{k: v for k, v in self.headers.items()}})
                step = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                step(self, server)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_port}/data/file.bin"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- behaviours ------------------------------------------------------------------------------------
def full(h, s):
    """200 with the whole body; honours Range (+If-Range on the ETag) like a real server."""
    rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
    if rng and (if_range is None or if_range == s.etag):
        start = int(rng.split("=")[1].split("-")[0])
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(s.body) - 1}/{len(s.body)}")
        body = s.body[start:]
    else:
        h.send_response(200)
        body = s.body
    h.send_header("Content-Length", str(len(body)))
    h.send_header("ETag", s.etag)
    h.end_headers()
    h.wfile.write(body)


def ignore_range(h, s):
    h.send_response(200)
    h.send_header("Content-Length", str(len(s.body)))
    h.send_header("ETag", s.etag)
    h.end_headers()
    h.wfile.write(s.body)


def status(code, headers=None):
    def step(h, s):
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return step


def half_then_reset(h, s):
    """Promise the whole body, send half, then reset the connection."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(s.body)))
    h.send_header("ETag", s.etag)
    h.end_headers()
    h.wfile.write(s.body[: len(s.body) // 2])
    h.wfile.flush()
    threading.Event().wait(0.2)  # let the client read the half before the reset discards it
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.close_connection = True
    h.connection.close()


def half_without_length(h, s):
    """Close-delimited body cut in half: no transport error at all (RELIABILITY 0.2)."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(s.body[: len(s.body) // 2])
    h.close_connection = True


def wrong_start(h, s):
    h.send_response(206)
    h.send_header("Content-Range", f"bytes 0-{len(s.body) - 1}/{len(s.body)}")
    h.send_header("Content-Length", str(len(s.body)))
    h.end_headers()
    h.wfile.write(s.body)


def gzip_header(h, s):
    """Claims Content-Encoding: gzip; the bytes on disk must still equal the resource."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(s.body)))
    h.send_header("Content-Encoding", "gzip")
    h.end_headers()
    h.wfile.write(s.body)


@pytest.fixture
def sleeps(monkeypatch):
    calls = []
    monkeypatch.setattr(dl, "sleep", calls.append)
    return calls


def gets(server):
    return len(server.log)


# -- tests -----------------------------------------------------------------------------------------
def test_happy_path_sends_identity_encoding(tmp_path, sleeps):
    with Server([full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "file.bin", sha256=SHA, size=len(PAYLOAD))
    assert got.path.read_bytes() == PAYLOAD and got.sha256 == SHA and got.size == len(PAYLOAD)
    assert gets(srv) == 1 and srv.log[0]["Accept-Encoding"] == "identity"
    assert not list(tmp_path.glob("*.part*")) and sleeps == []


def test_500_then_success_retries_once(tmp_path, sleeps):
    with Server([status(500), full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert got.sha256 == SHA and gets(srv) == 2 and len(sleeps) == 1


def test_429_retry_after_is_honoured(tmp_path, sleeps):
    with Server([status(429, {"Retry-After": "7"}), full]) as srv:
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert sleeps and sleeps[0] >= 7


def test_reset_mid_body_resumes_with_range(tmp_path, sleeps):
    with Server([half_then_reset, full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 2
    assert srv.log[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-" and srv.log[1]["If-Range"] == '"v1"'


def test_server_ignoring_range_restarts_instead_of_appending(tmp_path, sleeps):
    with Server([half_then_reset, ignore_range]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert "Range" in srv.log[1]
    assert got.path.read_bytes() == PAYLOAD  # not half + whole


def test_partial_content_at_wrong_offset_fails_that_attempt(tmp_path, sleeps):
    with Server([half_then_reset, wrong_start, full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 3
    assert "Range" not in srv.log[2]  # the bad 206 threw the partial file away


def test_truncated_body_without_length_is_caught_by_size(tmp_path, sleeps):
    with Server([half_without_length, full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA, size=len(PAYLOAD))
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 2


def test_truncated_body_without_length_is_caught_by_sha(tmp_path, sleeps):
    with Server([half_without_length]) as srv, pytest.raises(ChecksumMismatch):
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert list(tmp_path.iterdir()) == []


def test_wrong_checksum_keeps_nothing(tmp_path, sleeps):
    with Server([full], body=b"<html>not the file</html>") as srv, pytest.raises(ChecksumMismatch) as err:
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert SHA in str(err.value) and srv.url in str(err.value)
    assert gets(srv) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [404, 403, 410])
def test_permanent_status_is_not_retried(tmp_path, sleeps, code):
    with Server([status(code)]) as srv, pytest.raises(DownloadError) as err:
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert not isinstance(err.value, ChecksumMismatch)
    assert gets(srv) == 1 and str(code) in str(err.value) and srv.url in str(err.value)
    assert list(tmp_path.iterdir()) == []


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the download: nothing listens there
    return f"http://127.0.0.1:{port}/f.zip"


def test_connection_refused_fails_fast_after_one_quick_retry(tmp_path, sleeps):
    url = closed_port_url()
    with pytest.raises(SourceUnreachable, match=rf"could not reach {url} after 2 attempts: connection refused") as err:
        dl.fetch(url, tmp_path / "f", sha256=SHA, attempts=3)
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 1  # one quick second try, not minutes of backoff
    assert not isinstance(err.value, TransientError) and not is_transient(err.value)  # Prefect does not retry it either
    assert "NEWSGROUPS_LSTM_GLOVE_URL" in str(err.value)


def test_stalled_server_times_out_and_retries(tmp_path, sleeps):
    def stall(h, s):
        threading.Event().wait(1.0)
        full(h, s)

    with Server([stall, full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA, timeout=(1.0, 0.2))
    assert got.sha256 == SHA and gets(srv) == 2


def test_mirror_is_used_when_primary_fails(tmp_path, sleeps):
    with Server([status(404)]) as bad, Server([full]) as good:
        got = dl.fetch([bad.url, good.url], tmp_path / "f", sha256=SHA)
    assert got.url == good.url and gets(bad) == 1


def test_raw_bytes_are_kept_despite_content_encoding(tmp_path, sleeps):
    with Server([gzip_header]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert got.path.read_bytes() == PAYLOAD


def test_not_enough_disk_fails_before_downloading(tmp_path, sleeps, monkeypatch):
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with Server([full]) as srv, pytest.raises(DownloadError, match="not enough free disk"):
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA, size=len(PAYLOAD))


def test_file_url_and_plain_path(tmp_path):
    src = tmp_path / "src dir" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    got = dl.fetch(src.as_uri(), tmp_path / "out1" / "a.bin", sha256=SHA)
    assert got.path.read_bytes() == PAYLOAD
    got = dl.fetch(str(src), tmp_path / "out2" / "a.bin", size=len(PAYLOAD))
    assert got.sha256 == SHA
    with pytest.raises(ChecksumMismatch):
        dl.fetch(str(src), tmp_path / "out3" / "a.bin", sha256="0" * 64)
    assert not (tmp_path / "out3" / "a.bin").exists()
    with pytest.raises(DownloadError, match="no such file"):
        dl.fetch(str(tmp_path / "missing"), tmp_path / "out4" / "x")
