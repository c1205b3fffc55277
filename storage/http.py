"""The HTTP transport of storage.download: one GET of one URL into `<dest>.part`, and prompt stopping.

`attempt` sends one request (following redirects, resuming `.part` with Range + If-Range when
that is safe), streams the raw bytes to disk while hashing them, and reports a failure worth
retrying as `Retry` (the retry loop lives in storage.download). It bounds what one response
may cost: a byte cap, a minimum average rate over a window, a read timeout (no byte for that
long), and the caller's deadline. `request_stop()` (a signal handler may call it) makes every
download in the process stop within about STOP_POLL_S: sleeps wake, and sockets that are
blocked in a read are shut down.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests
import urllib3

from storage.errors import ChecksumMismatch, DownloadError, DownloadInterrupted, TransientError
from storage.progress import Meter, Progress

log = logging.getLogger("newsgroups_lstm.progress")  # = tasks.step.PROGRESS_LOGGER: the CLI prints it

CHUNK = 1 << 20
NET_CHUNK = 256 * 1024
MAX_REDIRECTS = 10
DISK_MARGIN_BYTES = 64 * 1024**2
STOP_POLL_S = 0.2  # how often a sleeping download looks at the stop flag
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 451}
_REDIRECT_STATUS = {301, 302, 303, 307, 308}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_UNREACHABLE_ERRNO = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH}
USER_AGENT = "newsgroups-lstm/0.1 (+requests)"


@dataclass(frozen=True)
class Limits:
    """How long and how much one source may take; storage.download.fetch accepts overrides."""

    attempts: int = 5  # HTTP attempts per source (a deliberate fresh restart after a bad resume is free)
    backoff_s: float = 1.0  # first retry delay; doubles per attempt, jittered x0.5-1.5
    max_backoff_s: float = 60.0
    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0  # no byte for this long: stalled; retried, resuming
    min_rate_bps: float = 4096.0  # average below this over rate_window_s: trickling; retried, resuming
    rate_window_s: float = 60.0
    max_retry_after_s: float = 60.0  # a longer Retry-After is cut to this
    deadline_s: float = 3 * 3600.0  # per source, every attempt and wait included; then the next mirror
    max_bytes: int = 4 * 1024**3  # cap on a body whose size is not pinned (with or without Content-Length)
    quick_retry_s: float = 0.5  # the one retry after a name that does not resolve or a refused connection


class Retry(Exception):
    """This attempt failed in a way worth retrying (after `wait` seconds, if the server said so)."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class Unreachable(Retry):
    """The host does not resolve or refuses connections: worth one quick retry at most."""


class Restart(Exception):
    """The assembled file is wrong after a resume; throw it away and fetch it fresh once."""


# -- stopping ------------------------------------------------------------------------------------
_stop = False
_active: dict[int, requests.Response] = {}  # responses being read, so request_stop can cut them


def request_stop() -> None:
    """Ask every download in this process to stop now, keeping its `.part` for the next run.

    Safe in a signal handler (no locks): sleeping downloads wake within STOP_POLL_S and raise
    DownloadInterrupted; a read blocked on a silent server is cut by shutting its socket down.
    """
    global _stop
    _stop = True
    for resp in list(_active.values()):
        try:
            resp.raw.connection.sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass


def clear_stop() -> None:
    """Allow downloads again after request_stop (a long-lived process, or tests)."""
    global _stop
    _stop = False


def stop_requested() -> bool:
    return _stop


def check_stop(url: str) -> None:
    if _stop:
        raise DownloadInterrupted(f"download of {url} stopped on request; "
                                  "the partial file is kept and the next run resumes it")


def wait(seconds: float) -> None:
    """Sleep `seconds` in short slices, returning early once a stop is requested."""
    end = time.monotonic() + seconds
    while not _stop and (left := end - time.monotonic()) > 0:
        time.sleep(min(STOP_POLL_S, left))


# -- one attempt ---------------------------------------------------------------------------------
def attempt(session: requests.Session, url: str, dest: Path, *, sha256: str | None, size: int | None,
            limits: Limits, deadline: float, progress: Progress | None) -> tuple[str, int]:
    """One GET (following redirects), resuming `.part` when it is safe; return (sha256, bytes)."""
    part = part_path(dest)
    have, headers = _resume_headers(dest, url, sha256)
    resp = get_following_redirects(session, url, headers, (limits.connect_timeout_s, limits.read_timeout_s))
    with resp:
        have, total, resumed = _check_response(resp, url, dest, have)
        expected = size if size is not None else total
        cap = size if size is not None else limits.max_bytes
        if total is not None and total > cap:
            discard_part(dest)
            raise DownloadError(f"{url}: the server announces {total:,} bytes, more than the cap of {cap:,} "
                                f"bytes ({'the source size' if size is not None else 'max_bytes'}); nothing was kept")
        if expected is not None:
            check_free_space(dest.parent, expected - have, url)
        write_meta(dest, {"url": url, "validator": _validator(resp)})
        digest = hash_file(part, url) if resumed else hashlib.sha256()
        meter = Meter(url, expected, progress, start=have)
        written, lost = _stream(resp, url, dest, digest, have, resumed, cap, meter, limits, deadline)
        meter.done()
    short = lost is not None or (expected is not None and written < expected)
    if short and not (sha256 and digest.hexdigest() == sha256.lower()):
        raise lost or Retry(f"body ended early: {written:,} of {expected:,} bytes")  # keep .part: resume
    if short:  # the server promised more than it sent, but what arrived is the pinned file
        log.warning("%s: the server promised %s bytes and sent %s, which match the pinned sha256; accepted",
                    url, f"{expected:,}" if expected is not None else "more", f"{written:,}")
    try:
        verify(dest, url, digest.hexdigest(), sha256, size, written=written)
    except (ChecksumMismatch, DownloadError) as exc:
        if resumed:
            raise Restart(f"{url}: resumed file failed its check ({exc})") from None
        raise
    return digest.hexdigest(), written


def _resume_headers(dest: Path, url: str, sha256: str | None) -> tuple[int, dict[str, str]]:
    """Resume only what we can validate: the same URL and either a server validator (If-Range)
    or a pinned checksum that will catch a spliced file."""
    part, meta = part_path(dest), read_meta(dest)
    have = part.stat().st_size if part.exists() else 0
    if have and meta.get("url") == url and (meta.get("validator") or sha256):
        headers = {"Range": f"bytes={have}-"}
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
        return have, headers
    if have:
        discard_part(dest)
    return 0, {}


def _check_response(resp: requests.Response, url: str, dest: Path, have: int) -> tuple[int, int | None, bool]:
    """Classify the status; return (bytes already on disk, total size or None, whether this resumes)."""
    status = resp.status_code
    if status == 416 and have:  # our .part is already as long as (or longer than) the resource
        discard_part(dest)
        raise Retry(f"HTTP 416 for a resume from byte {have}; restarting")
    if status in _PERMANENT_STATUS or (400 <= status < 500 and status not in (408, 429)):
        discard_part(dest)
        raise DownloadError(f"{url}: HTTP {status} {resp.reason or ''}".rstrip())
    if status in (408, 429) or status >= 500:
        raise Retry(f"HTTP {status}", wait=retry_after(resp.headers.get("Retry-After")))
    if status not in (200, 206):
        raise DownloadError(f"{url}: unexpected HTTP {status}")
    if status == 206:
        start, _end, total = content_range(resp.headers.get("Content-Range"))
        if not have or start != have:
            discard_part(dest)  # never splice at the wrong offset (pip #14131)
            raise Retry(f"HTTP 206 starting at byte {start}, expected {have}")
        return have, total, True
    return 0, _int_or_none(resp.headers.get("Content-Length")), False  # a 200 to a range request: start over


def _validator(resp: requests.Response) -> str | None:
    validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    return None if validator and validator.startswith("W/") else validator  # weak ETags: not for If-Range


def _stream(resp, url: str, dest: Path, digest, have: int, resumed: bool, cap: int, meter: Meter,
            limits: Limits, deadline: float) -> tuple[int, Retry | None]:
    """Append the body to `.part`; return (bytes on disk, the Retry that cut it short or None)."""
    part, written = part_path(dest), have
    window_start, window_bytes = time.monotonic(), have
    _active[id(resp)] = resp
    try:
        with open(part, "ab" if resumed else "wb") as f:
            # read1: whatever has arrived, so bytes before a reset are kept (read(amt) would drop them);
            # decode_content=False: the bytes on disk are the resource, whatever Content-Encoding says.
            while block := _read(resp, url, written, limits):
                check_stop(url)
                if written + len(block) > cap:
                    discard_part(dest)
                    raise DownloadError(f"{url}: the body exceeds the cap of {cap:,} bytes (the source's "
                                        "size, else max_bytes); the partial file was removed")
                f.write(block)
                digest.update(block)
                written += len(block)
                meter.advance(len(block))
                now = time.monotonic()
                if now > deadline:
                    raise TransientError(f"{url}: gave up at the deadline of {limits.deadline_s:,.0f} s with "
                                         f"{written:,} bytes; the partial file is kept for the next run")
                if now - window_start >= limits.rate_window_s:
                    rate = (written - window_bytes) / (now - window_start)
                    if rate < limits.min_rate_bps:
                        raise Retry(f"too slow: {rate:,.0f} bytes/s over {now - window_start:.1f} s "
                                    f"(minimum {limits.min_rate_bps:,.0f}) after {written:,} bytes")
                    window_start, window_bytes = now, written
    except Retry as exc:
        return written, exc
    except OSError as exc:  # opening, writing or closing .part (read errors are Retry already)
        raise disk_error(exc, part, url, dest) from None
    finally:
        _active.pop(id(resp), None)
    check_stop(url)  # a stop shuts the socket down, which looks like the end of the body
    return written, None


def _read(resp, url: str, written: int, limits: Limits) -> bytes:
    try:
        return resp.raw.read1(NET_CHUNK, decode_content=False)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        check_stop(url)
        if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            raise Retry(f"stalled: no data for {limits.read_timeout_s:g} s after {written:,} bytes") from None
        raise Retry(f"connection lost after {written:,} bytes ({type(exc).__name__}: {exc})") from None


def get_following_redirects(session: requests.Session, url: str, headers: dict, timeout) -> requests.Response:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        check_stop(url)
        try:
            resp = session.get(current, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise DownloadError(f"{current}: TLS error ({exc}); fix the certificate or use a trusted mirror, "
                                "verification is never disabled") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
            raise DownloadError(f"{current}: invalid URL ({exc})") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if reason := unreachable_reason(exc):
                raise Unreachable(reason) from None
            raise Retry(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code not in _REDIRECT_STATUS or "Location" not in resp.headers:
            return resp
        target = urljoin(current, resp.headers["Location"])
        resp.close()
        if urlparse(current).scheme == "https" and urlparse(target).scheme != "https":
            raise DownloadError(f"{url}: refusing redirect from https to {target}")
        current = target
    raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects")


def unreachable_reason(exc: BaseException) -> str | None:
    """'name does not resolve' / 'connection refused' / 'network unreachable' when `exc` (a requests
    error, however deeply wrapped) says so; None for timeouts, resets and everything else."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return "the host name does not resolve (offline, or a wrong host name?)"
        if isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNO:
            return "connection refused (nothing listens there)" if e.errno == errno.ECONNREFUSED else \
                f"the network is unreachable ({e.strerror})"
        if isinstance(e, TimeoutError):  # (urllib3's NewConnectionError is a ConnectTimeoutError: look deeper)
            return None
        todo.extend([getattr(e, "reason", None), e.__cause__, e.__context__, *e.args])
    return None


# -- files and checks ----------------------------------------------------------------------------
def verify(dest: Path, url: str, got_sha: str, sha256: str | None, size: int | None, written: int) -> None:
    if size is not None and written != size:
        discard_part(dest)
        raise DownloadError(f"{url}: expected {size:,} bytes, got {written:,}; the file was discarded")
    if sha256 is not None and got_sha != sha256.lower():
        discard_part(dest)
        raise ChecksumMismatch(url, sha256.lower(), got_sha)


def hash_file(path: Path, url: str):
    """The sha256 object of a file's bytes so far (it can go on hashing what is appended)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            check_stop(url)
            digest.update(block)
    return digest


def disk_error(exc: OSError, path: Path, url: str, dest: Path, action: str = "write") -> DownloadError:
    """A DownloadError naming `path`; a full disk also loses the partial file, so the disk is not left full."""
    full = exc.errno in _DISK_FULL
    if full:
        discard_part(dest)
    what = exc.strerror or str(exc)
    return DownloadError(f"{url}: could not {action} {path}: {what} (errno {exc.errno})"
                         + ("; the partial file was removed to free the space" if full else ""))


def disk_margin(total: int) -> int:
    """Free space a download leaves: DISK_MARGIN_BYTES, at most 2% of the file system (a small disk is not refused)."""
    return min(DISK_MARGIN_BYTES, total // 50)


def check_free_space(directory: Path, needed: int, url: str) -> None:
    usage = shutil.disk_usage(directory)
    margin = disk_margin(usage.total)
    if needed + margin > usage.free:
        raise DownloadError(f"{url}: not enough free disk space in {directory}: need {needed:,} bytes "
                            f"(+{margin:,} margin), {usage.free:,} available")


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def content_range(value: str | None) -> tuple[int, int, int | None]:
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start, end = span.split("-", 1)
        if unit != "bytes":
            raise ValueError(unit)
        return int(start), int(end), (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        raise Retry(f"HTTP 206 with unusable Content-Range {value!r}") from None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def read_meta(dest: Path) -> dict:
    try:
        return json.loads(meta_path(dest).read_text())
    except (OSError, ValueError):
        return {}


def write_meta(dest: Path, meta: dict) -> None:
    tmp = meta_path(dest).with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path(dest))
    except OSError as exc:
        raise disk_error(exc, tmp, meta.get("url", "?"), dest) from None


def discard_part(dest: Path) -> None:
    """Remove `<dest>.part` and its resume record (the one helper for both)."""
    part_path(dest).unlink(missing_ok=True)
    meta_path(dest).unlink(missing_ok=True)
