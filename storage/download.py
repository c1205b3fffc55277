"""Fetching one file from http(s)://, file:// or a local path into a verified local file.

The bytes go to `<dest>.part` (resumable with Range + If-Range across attempts and runs),
are hashed while they stream, and become `dest` only after the size and sha256 check
passes; a `.part` that already has the pinned sha256 is accepted without a request.
Transient failures (timeouts, resets, stalls, trickles, 5xx, 429) are retried here with
exponential backoff and jitter (Prefect adds no jitter to task retries),
within a per-source deadline and with Retry-After capped; permanent ones (404/403/410, TLS
errors, checksum mismatch, a body over the size cap) fail at once. A host that does not
resolve or refuses connections gets one quick second try, then the next mirror; when every
source fails, one error lists each URL with its reason and how to use local copies.
`request_stop()` (or `stop_on_signals()`) stops every download promptly, keeping its `.part`.

Also here: `forget_download`, to drop the record of what an unpinned URL gave (the store's URL index,
written only for an archive that passed the magic-bytes check) when its archive turns out unusable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import random
import shutil  # noqa: F401 - tests patch storage.download.shutil.disk_usage (the module http.py uses)
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from storage import http
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import ChecksumMismatch, DownloadError, NotAnArchive, SourceUnreachable, TransientError
from storage.http import Limits, clear_stop, request_stop, stop_requested  # noqa: F401 - the public API
from storage.progress import Meter, Progress

log = logging.getLogger("newsgroups_lstm.progress")  # = tasks.step.PROGRESS_LOGGER: the CLI prints it

CHUNK = 1 << 20
sleep = http.wait  # module attribute so tests can monkeypatch storage.download.sleep; wakes on request_stop
LOCAL_COPIES_HINT = (
    "To use local copies instead, point the sources at them (a file:// URL, a path or a local http server) with "
    "NEWSGROUPS_LSTM_GLOVE_URL + NEWSGROUPS_LSTM_GLOVE_SHA256 and NEWSGROUPS_LSTM_CORPUS_URL + "
    "NEWSGROUPS_LSTM_CORPUS_SHA256, or the config keys sources.glove.url / sources.corpus_source.url "
    "(each with its sha256); see the README section \"Quickstart on local copies of the data\"."
)


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int
    url: str  # the URL (primary or mirror) the bytes came from


def fetch(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    size: int | None = None,
    attempts: int | None = None,
    backoff_s: float | None = None,
    timeout: tuple[float, float] | None = None,
    limits: Limits | None = None,
    progress: Progress | None = None,
    require_archive: bool = False,
) -> Fetched:
    """Download the first of `urls` that works to `dest`, verified; return where and what it is.

    `dest`'s directory is private scratch (the caller's lock): `<dest>.part` there is resumed.
    `attempts`, `backoff_s` and `timeout` (connect, read) override the same fields of `limits`.
    With `require_archive` and no `sha256`, the file must start like the archive its name
    promises (zip, gzip, tar), else NotAnArchive (and the next mirror is tried).
    Raises ChecksumMismatch (nothing kept), SourceUnreachable (offline or wrong host: not
    worth retrying), DownloadError (permanent), TransientError, or DownloadInterrupted.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise DownloadError("no URL to download from")
    limits = _limits(limits, attempts, backoff_s, timeout)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if got := _complete_part(dest, urls[0], sha256, size):
        return got
    errors: list[tuple[str, Exception]] = []
    for url in urls:
        http.check_stop(url)
        try:
            got = _fetch_one(url, dest, sha256=sha256, size=size, limits=limits, progress=progress)
            if require_archive and sha256 is None:
                check_archive(got.path, dest.name, url)
            return got
        except (DownloadError, TransientError) as exc:  # a mirror may hold the right bytes
            errors.append((url, exc))
        if url != urls[-1]:
            log.warning("download from %s failed (%s); trying the next mirror", url, errors[-1][1])
    raise _all_failed(errors)


def _limits(limits: Limits | None, attempts, backoff_s, timeout) -> Limits:
    limits = limits or Limits()
    changes = {"attempts": attempts, "backoff_s": backoff_s}
    if timeout is not None:
        changes.update(connect_timeout_s=timeout[0], read_timeout_s=timeout[1])
    return dataclasses.replace(limits, **{k: v for k, v in changes.items() if v is not None})


def _all_failed(errors: list[tuple[str, Exception]]) -> Exception:
    """One error for a source whose every URL failed: the most retryable kind, each URL's reason, the way out."""
    if len(errors) == 1:
        exc = errors[0][1]
        if isinstance(exc, (SourceUnreachable, TransientError)):
            return type(exc)(f"{exc}. {LOCAL_COPIES_HINT}")
        return exc
    summary = "; ".join(f"[{u}] {str(e).removeprefix(f'{u}: ')}" for u, e in errors)
    if any(isinstance(e, TransientError) for _, e in errors):
        return TransientError(f"every source failed, some transiently: {summary}. {LOCAL_COPIES_HINT}")
    if all(isinstance(e, SourceUnreachable) for _, e in errors):
        return SourceUnreachable(f"every source failed: {summary}. {LOCAL_COPIES_HINT}")
    for _, e in errors:
        if isinstance(e, ChecksumMismatch):
            return e
    return DownloadError(f"every source failed: {summary}. {LOCAL_COPIES_HINT}")


def _fetch_one(url: str, dest: Path, *, sha256, size, limits: Limits, progress) -> Fetched:
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(url, dest, sha256=sha256, size=size, limits=limits, progress=progress)
    if scheme == "file":
        parsed = urlparse(url)
        return _copy_local(Path(unquote(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost")
                                else unquote(parsed.path)), url, dest, sha256=sha256, size=size, progress=progress)
    if scheme == "" or len(scheme) == 1:  # a plain path (one letter: a Windows drive)
        return _copy_local(Path(url).expanduser(), url, dest, sha256=sha256, size=size, progress=progress)
    raise DownloadError(f"unsupported URL scheme {scheme!r} in {url} (use http, https, file or a path)")


def _complete_part(dest: Path, url: str, sha256: str | None, size: int | None) -> Fetched | None:
    """A `.part` left by an earlier attempt or run that already is the pinned file: take it, no request."""
    part = http.part_path(dest)
    if not sha256 or not part.is_file():
        return None
    have = part.stat().st_size
    if have == 0 or (size is not None and have != size):
        return None
    if http.hash_file(part, url).hexdigest() != sha256.lower():
        return None
    log.info("%s already holds the pinned sha256 of %s; not downloading it again", part, url)
    return _finish(dest, http.read_meta(dest).get("url", url), sha256.lower(), have)


def _finish(dest: Path, url: str, digest: str, size: int) -> Fetched:
    try:
        os.replace(http.part_path(dest), dest)
    except OSError as exc:
        raise http.disk_error(exc, dest, url, dest) from None
    http.meta_path(dest).unlink(missing_ok=True)
    return Fetched(dest, digest, size, url)


# -- local files ---------------------------------------------------------------------------------
def _copy_local(src: Path, url: str, dest: Path, *, sha256, size, progress) -> Fetched:
    if not src.is_file():
        raise DownloadError(f"{url}: no such file ({src})")
    total = src.stat().st_size
    http.check_free_space(dest.parent, total, url)
    part = http.part_path(dest)
    http.meta_path(dest).unlink(missing_ok=True)  # this .part is not resumable over http
    digest = hashlib.sha256()
    meter = Meter(url, total, progress)
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout:
            while block := fin.read(CHUNK):
                http.check_stop(url)
                fout.write(block)
                digest.update(block)
                meter.advance(len(block))
    except OSError as exc:
        raise http.disk_error(exc, part, url, dest, action=f"copy {src} to") from None
    meter.done()
    http.verify(dest, url, digest.hexdigest(), sha256, size, written=total)
    return _finish(dest, url, digest.hexdigest(), total)


# -- http(s): the retry loop ---------------------------------------------------------------------
def _fetch_http(url: str, dest: Path, *, sha256, size, limits: Limits, progress) -> Fetched:
    tries = _Tries(url, limits, time.monotonic() + limits.deadline_s)
    with requests.Session() as session:
        session.headers.update({"User-Agent": http.USER_AGENT, "Accept-Encoding": "identity"})
        while True:
            try:
                digest, total = http.attempt(session, url, dest, sha256=sha256, size=size, limits=limits,
                                             deadline=tries.deadline, progress=progress)
                return _finish(dest, url, digest, total)
            except http.Restart as exc:
                http.discard_part(dest)
                tries.restart(exc)
            except http.Retry as exc:
                sleep(tries.failed(exc))
                http.check_stop(url)


class _Tries:
    """Counts the attempts at one URL and decides how long to wait before the next, or to give up."""

    def __init__(self, url: str, limits: Limits, deadline: float):
        self.url, self.limits, self.deadline = url, limits, deadline
        self.done = self.unreachable = 0
        self.fresh_restart_left = 1  # a file that fails its check after a resume is fetched fresh, once
        self.reached = False  # something answered: later refusals are a restart, not an offline machine

    def restart(self, exc: Exception) -> None:
        if self.fresh_restart_left == 0:
            raise DownloadError(str(exc)) from None
        self.fresh_restart_left -= 1  # a deliberate fresh start is not a failed attempt
        log.warning("%s; downloading it again from scratch", exc)

    def failed(self, exc: http.Retry) -> float:
        """The seconds to wait before the next attempt; raises when this URL is done for."""
        self.done += 1
        lim = self.limits
        if isinstance(exc, http.Unreachable) and not self.reached:
            self.unreachable += 1
            if self.unreachable >= 2 or self.done >= lim.attempts:
                raise SourceUnreachable(f"could not reach {self.url} after {self.done} "
                                        f"attempt{'s' if self.done > 1 else ''}: {exc}")
            delay = lim.quick_retry_s
        else:
            self.reached = self.reached or not isinstance(exc, http.Unreachable)
            if self.done >= lim.attempts:
                raise TransientError(f"could not reach {self.url} after {lim.attempts} attempts: {exc}")
            delay = min(lim.max_backoff_s, lim.backoff_s * 2 ** (self.done - 1)) * random.uniform(0.5, 1.5)
            if exc.wait is not None:
                delay = max(delay, min(exc.wait, lim.max_retry_after_s))
        if time.monotonic() + delay > self.deadline:
            raise TransientError(f"{self.url}: gave up at the deadline of {lim.deadline_s:,.0f} s after "
                                 f"{self.done} attempts (last: {exc}); a partial file is kept for the next run")
        log.warning("download attempt %d/%d of %s failed (%s); retrying in %.1f s",
                    self.done, lim.attempts, self.url, exc, delay)
        return delay


# -- stopping on signals -------------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM first call request_stop() (download threads stop within
    about a second, keeping their .part), then act as before: the previous handler, or for the
    default one KeyboardInterrupt (SIGINT) / SystemExit(128 + signal). Main thread only."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, functools.partial(_on_signal, previous[sig]))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _on_signal(previous, signum: int, frame) -> None:
    request_stop()
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


# -- is it the archive its name promises? --------------------------------------------------------
def archive_kind(name: str) -> str | None:
    """The archive type a file name promises ('zip', 'gzip', 'tar', 'bzip2', 'xz'), or None."""
    name = name.lower()
    for suffixes, kind in ((".zip",), "zip"), ((".tar.gz", ".tgz", ".gz"), "gzip"), ((".tar",), "tar"), \
                          ((".tar.bz2", ".tbz2", ".bz2"), "bzip2"), ((".tar.xz", ".txz", ".xz"), "xz"):
        if name.endswith(suffixes):
            return kind
    return None


def sniff_archive(head: bytes) -> str | None:
    """The archive type the first 512 bytes of a file show, by magic bytes, or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


def check_archive(path: Path, name: str, url: str) -> None:
    """Raise NotAnArchive (and delete `path`) unless it starts like the archive `name` promises
    (any archive when the name promises none)."""
    with open(path, "rb") as f:
        head = f.read(512)
    got, want = sniff_archive(head), archive_kind(name)
    if got is not None and want in (None, got):
        return
    path.unlink(missing_ok=True)
    text = head.lstrip().lower()
    what = ("an HTML page" if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:200]
            else f"a {got} file" if got else "unrecognised content")
    raise NotAnArchive(f"{url} served something that is not {('a ' + want) if want else 'an'} archive but {what} "
                       f"({len(head):,}+ bytes starting {head[:64]!r}); nothing was recorded for this URL; "
                       "check the URL (a login or error page?) or pin the file's sha256")


# -- the record of what an unpinned URL gave lives in the store (ArtifactStore.seen_sha256) ----------
def forget_download(ref: ArtifactRef, data_home: str | None = None) -> bool:
    """Drop the record of the URL a download artifact came from, if it was unpinned (for a parse step
    that found the archive unusable), so the next run fetches it again; True if a record was dropped."""
    store = ArtifactStore(data_home)
    manifest = store.read_manifest(ref) or {}
    url = (manifest.get("params") or {}).get("url")
    if manifest.get("pinned") or not url:
        return False
    return store.forget_url(url)
