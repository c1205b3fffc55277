"""A real loopback HTTP server for the download tests, driven by a per-test script of behaviours."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAYLOAD = bytes(range(256)) * 800  # 204,800 bytes
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """ThreadingHTTPServer on 127.0.0.1; `script` is a list of behaviours, one per GET (last repeats)."""

    def __init__(self, script, body=PAYLOAD, etag='"v1"'):
        self.script, self.body, self.etag, self.log = list(script), body, etag, []
        self.release = threading.Event()  # set on exit: frees handlers that wait
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
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


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
    """Close-delimited body cut in half: no transport error at all."""
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


def closed_port_url():
    """A URL on a 127.0.0.1 port that nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the download: nothing listens there
    return f"http://127.0.0.1:{port}/f.zip"


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def endless(h, s):
    """A close-delimited body that never ends (no Content-Length)."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    try:
        for _ in range(2000):  # 128 MB at most, should the client never stop
            h.wfile.write(b"x" * 65536)
    except OSError:
        pass


def trickle(h, s):
    """The right headers, then the body a kilobyte at a time, far below any useful rate."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(s.body)))
    h.send_header("ETag", s.etag)
    h.end_headers()
    try:
        for i in range(0, len(s.body), 1000):
            h.wfile.write(s.body[i:i + 1000])
            h.wfile.flush()
            time.sleep(0.05)
    except OSError:
        pass
    h.close_connection = True


def lying_length(h, s):
    """Promises more bytes than the file has, sends the whole file, closes."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(s.body) + 1000))
    h.send_header("ETag", s.etag)
    h.end_headers()
    h.wfile.write(s.body)
    h.close_connection = True


def half_then_silence(seconds):
    """Promise the whole body, send half, then say nothing for `seconds` (a stalled server)."""
    def step(h, s):
        h.send_response(200)
        h.send_header("Content-Length", str(len(s.body)))
        h.send_header("ETag", s.etag)
        h.end_headers()
        h.wfile.write(s.body[: len(s.body) // 2])
        h.wfile.flush()
        s.release.wait(seconds)
        h.close_connection = True
    return step
