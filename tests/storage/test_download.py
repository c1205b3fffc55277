"""storage.download against a real loopback HTTP server driven by a per-test script."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

import storage.download as dl
from storage.errors import ChecksumMismatch, DownloadError, DownloadInterrupted, NotAnArchive, SourceUnreachable, TransientError
from tasks.step import is_transient
from tests.storage._http_server import (
    PAYLOAD,
    SHA,
    Server,
    closed_port_url,
    endless,
    full,
    gzip_header,
    half_then_reset,
    half_then_silence,
    half_without_length,
    ignore_range,
    lying_length,
    status,
    trickle,
    wait_for,
    wrong_start,
)

# -- behaviours ------------------------------------------------------------------------------------


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
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000, "total": 10**9})())
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


# -- prompt shutdown -------------------------------------------------------------------------------
_CHILD = r"""
import concurrent.futures, signal, sys
import storage.download as dl
from storage.errors import DownloadInterrupted
url, dest, sha, mode = sys.argv[1:]
def run():
    return dl.fetch(url, dest, sha256=sha, backoff_s=0.05)
try:
    if mode == "stop_on_signals":  # what the CLI does: stop downloads, then the usual meaning of the signal
        with dl.stop_on_signals():
            run()
    else:  # Prefect's way: the download runs in a worker thread; the handler only asks it to stop
        signal.signal(signal.SIGTERM, lambda *a: dl.request_stop())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(run).result()
except DownloadInterrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize("mode, code", [("worker_thread", 3), ("stop_on_signals", 128 + signal.SIGTERM)])
def test_sigterm_during_a_retry_after_wait_exits_within_5s_and_keeps_the_part(tmp_path, mode, code):
    dest = tmp_path / "f"
    with Server([half_then_reset, status(503, {"Retry-After": "300"})]) as srv:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, srv.url, str(dest), SHA, mode], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: gets(srv) >= 2 or proc.poll() is not None)
            time.sleep(0.3)  # now inside the (capped, 60 s) Retry-After wait
            assert proc.poll() is None
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=5)
            assert time.monotonic() - started < 5
        finally:
            proc.kill()
    assert proc.returncode == code, err.decode()
    assert gets(srv) == 2 and srv.log[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert (tmp_path / "f.part").read_bytes() == PAYLOAD[: len(PAYLOAD) // 2]  # kept: the next run resumes it
    assert (tmp_path / "f.part.json").exists() and not dest.exists()


def test_request_stop_cuts_a_read_blocked_on_a_silent_server(tmp_path, sleeps):
    outcome = []
    with Server([half_then_silence(30)]) as srv:
        worker = threading.Thread(target=lambda: outcome.append(_run(dl.fetch, srv.url, tmp_path / "f", sha256=SHA)))
        try:
            worker.start()
            wait_for(lambda: (tmp_path / "f.part").exists() and (tmp_path / "f.part").stat().st_size == len(PAYLOAD) // 2)
            started = time.monotonic()
            dl.request_stop()
            worker.join(5)
            assert not worker.is_alive() and time.monotonic() - started < 3  # the read timeout is 60 s
        finally:
            dl.clear_stop()
    assert isinstance(outcome[0], DownloadInterrupted) and "partial file is kept" in str(outcome[0])
    assert (tmp_path / "f.part").stat().st_size == len(PAYLOAD) // 2 and sleeps == []


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - handed back to the test
        return exc


def test_retry_after_is_capped_and_the_deadline_bounds_the_waits(tmp_path, sleeps):
    with Server([status(503, {"Retry-After": "300"}), full]) as srv:
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert sleeps == [dl.Limits().max_retry_after_s] == [60.0]
    with Server([status(503, {"Retry-After": "300"})]) as srv, pytest.raises(TransientError, match="deadline of 5 s"):
        dl.fetch(srv.url, tmp_path / "g", sha256=SHA, limits=dl.Limits(deadline_s=5))
    assert gets(srv) == 1 and sleeps == [60.0]  # gave up instead of waiting past the deadline


# -- bounded downloads -----------------------------------------------------------------------------


@pytest.mark.parametrize("size, cap", [(None, 1_000_000), (len(PAYLOAD), len(PAYLOAD))])
def test_endless_body_without_length_stops_at_the_cap(tmp_path, sleeps, size, cap):
    with Server([endless]) as srv, pytest.raises(DownloadError) as err:
        dl.fetch(srv.url, tmp_path / "f", size=size, limits=dl.Limits(max_bytes=1_000_000))
    assert srv.url in str(err.value) and f"cap of {cap:,} bytes" in str(err.value)
    assert gets(srv) == 1 and sleeps == [] and list(tmp_path.iterdir()) == []  # not retried, .part removed


def test_announced_length_over_the_cap_fails_before_downloading(tmp_path, sleeps):
    def huge(h, s):
        h.send_response(200)
        h.send_header("Content-Length", str(5 * 1024**3))
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True

    cap = r"announces 5,368,709,120 bytes, more than the cap of 4,294,967,296"
    with Server([huge]) as srv, pytest.raises(DownloadError, match=cap):
        dl.fetch(srv.url, tmp_path / "f")
    assert gets(srv) == 1 and list(tmp_path.iterdir()) == []


def test_trickle_is_cut_by_the_minimum_rate_and_resumed(tmp_path, sleeps):
    with Server([trickle, full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA, limits=dl.Limits(min_rate_bps=100_000, rate_window_s=0.3))
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 2 and len(sleeps) == 1
    start = int(srv.log[1]["Range"].split("=")[1].rstrip("-"))
    assert 0 < start < len(PAYLOAD) // 4 and srv.log[1]["If-Range"] == '"v1"'  # resumed, not restarted


def test_stall_mid_body_times_out_and_resumes(tmp_path, sleeps):
    with Server([half_then_silence(5), full]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA, timeout=(1.0, 0.3))
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 2 and len(sleeps) == 1
    assert srv.log[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"


def test_deadline_gives_up_on_a_slow_source_and_uses_the_mirror(tmp_path, sleeps):
    started = time.monotonic()
    with Server([trickle]) as slow, Server([full]) as good:
        got = dl.fetch([slow.url, good.url], tmp_path / "f", sha256=SHA, limits=dl.Limits(deadline_s=0.5, min_rate_bps=0))
    assert got.url == good.url and got.path.read_bytes() == PAYLOAD and gets(slow) == 1
    assert time.monotonic() - started < 3


def test_content_length_larger_than_the_body_is_accepted_when_the_pinned_sha_matches(tmp_path, sleeps):
    with Server([lying_length]) as srv:
        got = dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 1 and sleeps == []
    # A complete .part from an earlier run (say, one that gave up on such a server) needs no request at all.
    (tmp_path / "g.part").write_bytes(PAYLOAD)
    with Server([status(500)]) as srv:
        got = dl.fetch(srv.url, tmp_path / "g", sha256=SHA, size=len(PAYLOAD))
    assert got.path.read_bytes() == PAYLOAD and gets(srv) == 0 and not (tmp_path / "g.part").exists()
    with Server([lying_length]) as srv, pytest.raises(TransientError, match="could not reach"):  # unpinned: no proof
        dl.fetch(srv.url, tmp_path / "h", attempts=2)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_removes_the_part_and_names_the_path(tmp_path, sleeps):
    (tmp_path / "f.part").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with Server([full]) as srv, pytest.raises(DownloadError) as err:
        dl.fetch(srv.url, tmp_path / "f", sha256=SHA)
    assert f"could not write {tmp_path / 'f.part'}" in str(err.value) and "No space left" in str(err.value)
    assert not os.path.lexists(tmp_path / "f.part") and gets(srv) == 1 and sleeps == []


# -- offline ---------------------------------------------------------------------------------------
def test_offline_every_source_fails_fast_with_one_helpful_error(tmp_path):
    refused, unresolvable = closed_port_url(), "http://nonexistent.invalid/x.zip"  # .invalid never resolves
    started = time.monotonic()
    with pytest.raises(SourceUnreachable) as err:
        dl.fetch([refused, unresolvable], tmp_path / "x.zip", sha256=SHA)  # real (quick) retry sleeps
    assert time.monotonic() - started < 15
    message = str(err.value)
    assert f"[{refused}] could not reach {refused} after 2 attempts: connection refused" in message
    assert f"[{unresolvable}] could not reach {unresolvable} after" in message and "does not resolve" in message
    for hint in ("NEWSGROUPS_LSTM_GLOVE_URL", "NEWSGROUPS_LSTM_GLOVE_SHA256", "NEWSGROUPS_LSTM_CORPUS_URL",
                 "NEWSGROUPS_LSTM_CORPUS_SHA256", "sources.glove.url", "sources.corpus_source.url",
                 '"Quickstart on local copies of the data"'):
        assert hint in message
    assert not is_transient(err.value)


# -- is it an archive? -----------------------------------------------------------------------------
def test_unpinned_file_must_be_the_archive_its_name_promises(tmp_path):
    zipped, tarred, gzipped = tmp_path / "a.zip", tmp_path / "a.tar", tmp_path / "a.tar.gz"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("x.txt", "x")
    with tarfile.open(tarred, "w") as t:
        t.add(zipped, "x.zip")
    gzipped.write_bytes(gzip.compress(b"x"))
    for src in (zipped, tarred, gzipped):
        got = dl.fetch(str(src), tmp_path / "out" / src.name, require_archive=True)
        assert got.path.read_bytes() == src.read_bytes()
    assert dl.fetch(str(gzipped), tmp_path / "out" / "noext", require_archive=True)  # no promise: any archive
    with pytest.raises(NotAnArchive, match=r"is not a zip archive but a gzip file"):
        dl.fetch(str(gzipped), tmp_path / "out2" / "a.zip", require_archive=True)
    assert list((tmp_path / "out2").iterdir()) == []
    assert dl.fetch(str(gzipped), tmp_path / "out3" / "a.zip", sha256=hashlib.sha256(gzipped.read_bytes()).hexdigest(),
                    require_archive=True)  # pinned: the sha256 is proof enough
