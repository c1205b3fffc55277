"""Fetching one file from http(s)://, file:// or a local path into a verified local file.

The bytes go to `<dest>.part` (resumable with Range + If-Range across attempts and runs),
are hashed while they stream, and become `dest` only after the size and sha256 check
passes. Transient failures (timeouts, resets, 5xx, 429) are retried here with exponential
backoff and jitter (Prefect adds no jitter to task retries, RELIABILITY 0.6); permanent
ones (404/403/410, TLS errors, checksum mismatch) fail at once. Mirrors are tried in order.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import requests
import urllib3

from storage.errors import ChecksumMismatch, DownloadError, TransientError

log = logging.getLogger("newsgroups_lstm.progress")  # = tasks.common.PROGRESS_LOGGER: the CLI prints it

CHUNK = 1 << 20
NET_CHUNK = 256 * 1024
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0
ATTEMPTS = 5
BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0
MAX_REDIRECTS = 10
DISK_MARGIN_BYTES = 64 * 1024**2
PROGRESS_LOG_MIN_BYTES = 16 * 1024**2  # below this, no 10% log lines
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 451}
_REDIRECT_STATUS = {301, 302, 303, 307, 308}
_USER_AGENT = "newsgroups-lstm/0.1 (+requests)"

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)
sleep = time.sleep  # module attribute so tests can monkeypatch storage.download.sleep


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int
    url: str  # the URL (primary or mirror) the bytes came from


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying (after `wait` seconds, if given)."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class _Restart(Exception):
    """Internal: the assembled file is wrong after a resume; throw it away and fetch it fresh once."""


def fetch(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    size: int | None = None,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    progress: Progress | None = None,
) -> Fetched:
    """Download the first of `urls` that works to `dest`, verified; return where and what it is.

    `dest`'s directory is private scratch (the caller's lock): `<dest>.part` there is resumed.
    Raises ChecksumMismatch (nothing kept), DownloadError (permanent) or TransientError.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise DownloadError("no URL to download from")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[tuple[str, Exception]] = []
    for url in urls:
        try:
            return _fetch_one(url, dest, sha256=sha256, size=size, attempts=attempts, backoff_s=backoff_s,
                              timeout=timeout, progress=progress)
        except DownloadError as exc:  # includes ChecksumMismatch: a mirror may hold the right bytes
            errors.append((url, exc))
        except TransientError as exc:
            errors.append((url, exc))
        if len(urls) > 1 and url != urls[-1]:
            log.warning("download from %s failed (%s); trying the next mirror", url, errors[-1][1])
    if len(errors) == 1:
        raise errors[0][1]
    summary = "; ".join(f"{u}: {e}" for u, e in errors)
    if any(isinstance(e, TransientError) for _, e in errors):
        raise TransientError(f"every source failed, some transiently: {summary}")
    for _, e in errors:
        if isinstance(e, ChecksumMismatch):
            raise e
    raise DownloadError(f"every source failed: {summary}")


def _fetch_one(url, dest: Path, *, sha256, size, attempts, backoff_s, timeout, progress) -> Fetched:
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(url, dest, sha256=sha256, size=size, attempts=attempts, backoff_s=backoff_s,
                           timeout=timeout, progress=progress)
    if scheme == "file":
        parsed = urlparse(url)
        return _copy_local(Path(unquote(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost")
                                else unquote(parsed.path)), url, dest, sha256=sha256, size=size, progress=progress)
    if scheme == "" or len(scheme) == 1:  # a plain path (one letter: a Windows drive)
        return _copy_local(Path(url).expanduser(), url, dest, sha256=sha256, size=size, progress=progress)
    raise DownloadError(f"unsupported URL scheme {scheme!r} in {url} (use http, https, file or a path)")


# -- local files ---------------------------------------------------------------------------------
def _copy_local(src: Path, url: str, dest: Path, *, sha256, size, progress) -> Fetched:
    if not src.is_file():
        raise DownloadError(f"{url}: no such file ({src})")
    total = src.stat().st_size
    _check_free_space(dest.parent, total, url)
    part = _part(dest)
    digest = hashlib.sha256()
    meter = _Meter(url, total, progress)
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while block := fin.read(CHUNK):
            fout.write(block)
            digest.update(block)
            meter.advance(len(block))
    meter.done()
    _verify(part, url, digest.hexdigest(), sha256, size)
    os.replace(part, dest)
    return Fetched(dest, digest.hexdigest(), total, url)


# -- http(s) -------------------------------------------------------------------------------------
def _fetch_http(url, dest: Path, *, sha256, size, attempts, backoff_s, timeout, progress) -> Fetched:
    last: Exception | None = None
    fresh_restart_left = 1  # a file that fails its check after a resume is fetched fresh, once
    attempt = 0
    with requests.Session() as session:
        session.headers.update({"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
        while attempt < attempts:
            attempt += 1
            try:
                digest, total = _attempt(session, url, dest, sha256=sha256, size=size, timeout=timeout, progress=progress)
                os.replace(_part(dest), dest)
                _meta_path(dest).unlink(missing_ok=True)
                return Fetched(dest, digest, total, url)
            except _Restart as exc:
                _discard_part(dest)
                if fresh_restart_left == 0:
                    raise DownloadError(str(exc)) from None
                fresh_restart_left -= 1
                attempt -= 1  # a deliberate fresh start is not a failed attempt
                log.warning("%s; downloading it again from scratch", exc)
                continue
            except _Retry as exc:
                last = exc
                if attempt >= attempts:
                    break
                delay = min(MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if exc.wait is not None:
                    delay = max(delay, min(exc.wait, MAX_RETRY_AFTER_S))
                log.warning("download attempt %d/%d of %s failed (%s); retrying in %.1f s", attempt, attempts, url, exc, delay)
                sleep(delay)
    raise TransientError(f"could not reach {url} after {attempts} attempts: {last}")


def _attempt(session: requests.Session, url, dest: Path, *, sha256, size, timeout, progress) -> tuple[str, int]:
    """One GET (following redirects), resuming `.part` when it is safe; return (sha256, bytes)."""
    part = _part(dest)
    meta = _read_meta(dest)
    have = part.stat().st_size if part.exists() else 0
    headers = {}
    # Resume only what we can validate: the same URL and either a server validator (If-Range)
    # or a pinned checksum that will catch a spliced file.
    if have and meta.get("url") == url and (meta.get("validator") or sha256):
        headers["Range"] = f"bytes={have}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    elif have:
        _discard_part(dest)
        have = 0

    resp = _get_following_redirects(session, url, headers, timeout)
    with resp:
        status = resp.status_code
        if status == 416 and have:  # our .part is already as long as (or longer than) the resource
            _discard_part(dest)
            raise _Retry(f"HTTP 416 for a resume from byte {have}; restarting")
        if status in _PERMANENT_STATUS or (400 <= status < 500 and status not in (408, 429)):
            _discard_part(dest)
            raise DownloadError(f"{url}: HTTP {status} {resp.reason or ''}".rstrip())
        if status == 429 or status == 408 or status >= 500:
            raise _Retry(f"HTTP {status}", wait=_retry_after(resp.headers.get("Retry-After")))
        if status not in (200, 206):
            raise DownloadError(f"{url}: unexpected HTTP {status}")

        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if validator and validator.startswith("W/"):
            validator = None  # weak ETags are not allowed in If-Range
        resumed = False
        if status == 206:
            start, end, total = _content_range(resp.headers.get("Content-Range"), url)
            if not have or start != have:
                _discard_part(dest)  # never splice at the wrong offset (pip #14131)
                raise _Retry(f"HTTP 206 starting at byte {start}, expected {have}")
            resumed = True
        else:
            total = _int_or_none(resp.headers.get("Content-Length"))
            have = 0  # a 200 to a range request is the whole file: start over, never append
        expected = size if size is not None else total
        if expected is not None:
            _check_free_space(dest.parent, expected - have, url)
        _write_meta(dest, {"url": url, "validator": validator})

        digest = hashlib.sha256()
        if resumed:
            with open(part, "rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
        meter = _Meter(url, expected, progress, start=have)
        written = have
        try:
            with open(part, "ab" if resumed else "wb") as f:
                # read1: whatever has arrived, so bytes before a reset are kept (read(amt) would drop them);
                # decode_content=False: the bytes on disk are the resource, whatever Content-Encoding says.
                while block := resp.raw.read1(NET_CHUNK, decode_content=False):
                    f.write(block)
                    digest.update(block)
                    written += len(block)
                    meter.advance(len(block))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
                raise DownloadError(f"{url}: could not write {part}: {exc}") from exc
            raise _Retry(f"connection lost after {written:,} bytes ({type(exc).__name__}: {exc})") from None
        meter.done()

    if expected is not None and written < expected:
        raise _Retry(f"body ended early: {written:,} of {expected:,} bytes")  # keep .part: resume
    try:
        _verify(part, url, digest.hexdigest(), sha256, size, written=written)
    except (ChecksumMismatch, DownloadError) as exc:
        if resumed:
            raise _Restart(f"{url}: resumed file failed its check ({exc})") from None
        raise
    return digest.hexdigest(), written


def _get_following_redirects(session, url, headers, timeout) -> requests.Response:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            resp = session.get(current, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise DownloadError(f"{current}: TLS error ({exc}); fix the certificate or use a trusted mirror, "
                                "verification is never disabled") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
            raise DownloadError(f"{current}: invalid URL ({exc})") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code not in _REDIRECT_STATUS or "Location" not in resp.headers:
            return resp
        target = urljoin(current, resp.headers["Location"])
        resp.close()
        if urlparse(current).scheme == "https" and urlparse(target).scheme != "https":
            raise DownloadError(f"{url}: refusing redirect from https to {target}")
        current = target
    raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects")


# -- checks and helpers --------------------------------------------------------------------------
def _verify(part: Path, url: str, got_sha: str, sha256: str | None, size: int | None, written: int | None = None) -> None:
    written = part.stat().st_size if written is None else written
    if size is not None and written != size:
        _discard_part_file(part)
        raise DownloadError(f"{url}: expected {size:,} bytes, got {written:,}; the file was discarded")
    if sha256 is not None and got_sha != sha256.lower():
        _discard_part_file(part)
        raise ChecksumMismatch(url, sha256.lower(), got_sha)


def _check_free_space(directory: Path, needed: int, url: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed + DISK_MARGIN_BYTES > free:
        raise DownloadError(f"{url}: not enough free disk space in {directory}: need {needed:,} bytes "
                            f"(+{DISK_MARGIN_BYTES:,} margin), {free:,} available")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _content_range(value: str | None, url: str) -> tuple[int, int, int | None]:
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start, end = span.split("-", 1)
        if unit != "bytes":
            raise ValueError(unit)
        return int(start), int(end), (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        raise _Retry(f"HTTP 206 with unusable Content-Range {value!r}") from None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def _read_meta(dest: Path) -> dict:
    try:
        return json.loads(_meta_path(dest).read_text())
    except (OSError, ValueError):
        return {}


def _write_meta(dest: Path, meta: dict) -> None:
    tmp = _meta_path(dest).with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, _meta_path(dest))


def _discard_part_file(part: Path) -> None:
    part.unlink(missing_ok=True)
    part.with_name(part.name + ".json").unlink(missing_ok=True)


def _discard_part(dest: Path) -> None:
    _part(dest).unlink(missing_ok=True)
    _meta_path(dest).unlink(missing_ok=True)


class _Meter:
    """A progress bar on a terminal's stderr, a log line every ~10% for big files, and a callback."""

    def __init__(self, url: str, total: int | None, callback: Progress | None, start: int = 0):
        self.url, self.total, self.callback, self.done_bytes = url, total, callback, start
        self.tty = sys.stderr.isatty()
        self.log_lines = total is not None and total >= PROGRESS_LOG_MIN_BYTES
        self.next_decile = (start * 10 // total + 1) if total else 1
        self.name = url.rstrip("/").rsplit("/", 1)[-1]

    def advance(self, n: int) -> None:
        self.done_bytes += n
        if self.callback:
            self.callback(self.done_bytes, self.total)
        if self.total:
            if self.log_lines and self.done_bytes * 10 >= self.next_decile * self.total:
                self.next_decile = self.done_bytes * 10 // self.total + 1
                log.info("%s: %d%% (%s of %s bytes)", self.name, min(100, self.done_bytes * 100 // self.total),
                         f"{self.done_bytes:,}", f"{self.total:,}")
            if self.tty:
                frac = min(1.0, self.done_bytes / self.total)
                sys.stderr.write(f"\r{self.name} [{'#' * int(frac * 30):<30}] {frac:6.1%}")
                sys.stderr.flush()
        elif self.tty:
            sys.stderr.write(f"\r{self.name} {self.done_bytes / 1e6:,.1f} MB")
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
