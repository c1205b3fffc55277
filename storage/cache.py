"""The one local cache of object-store files on a host: verified copies by sha256, size-capped, LRU.

    <cache dir>/objects/<sha256[:2]>/<sha256><suffixes>         the bytes (suffixes kept: Keras wants .keras)
    <cache dir>/objects/<sha256[:2]>/<sha256><suffixes>.stamp   its stamp (storage.integrity); mtime = last use

A file enters the cache only after its sha256 was found equal to the manifest's while it was
downloaded (or because this host just built it and hashed it). A hit is checked against its
stamp, and a changed entry is dropped and downloaded again. Every process on the host shares
the directory; inserting past the cap evicts the least recently used entries, except those
used in the last GRACE_S seconds (a reader may be about to open them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from storage.home import cache_bytes, cache_dir
from storage.integrity import Damaged, Stamps, mismatch, stat_stamp

log = logging.getLogger("newsgroups_lstm.progress")  # = tasks.step.PROGRESS_LOGGER: the CLI prints it

GRACE_S = 30.0
STALE_INCOMING_S = 3600.0
_DATA = "data"  # the one name in an entry's stamp sidecar


class ObjectCache:
    def __init__(self, root: Path | None = None, cap_bytes: int | None = None):
        self.root = root or cache_dir()
        self.cap = cache_bytes() if cap_bytes is None else cap_bytes
        self.objects = self.root / "objects"

    def entry(self, sha256: str, name: str) -> Path:
        suffix = "".join(Path(name).suffixes)[-24:]
        return self.objects / sha256[:2] / f"{sha256}{suffix}"

    def get(self, name: str, meta: dict, fetch: Callable[[Path], str]) -> Path:
        """A verified local copy of the file `meta` describes (bytes, sha256).

        On a miss fetch(dest) writes the bytes to dest and returns the sha256 it saw; a copy that does
        not match is thrown away and Damaged is raised.
        """
        path = self.entry(meta["sha256"], name)
        if path.exists():
            stamps = Stamps(_sidecar(path))
            try:
                stamps.check(_DATA, path, meta)
                stamps.save()
                _touch(_sidecar(path))
                return path
            except Damaged as exc:
                log.warning("object cache: %s (%s); dropped, downloading it again", path, exc)
                self._drop(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=path.parent)
        os.close(fd)
        try:
            got = fetch(Path(tmp))
            size = os.path.getsize(tmp)
            if size != meta["bytes"] or got != meta["sha256"]:
                raise Damaged(mismatch(name, size, got, meta))
            self._install(Path(tmp), path, meta["sha256"])
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def adopt(self, source: Path, name: str, sha256: str) -> None:
        """Move a file this host just built and hashed into the cache (so its readers need no download)."""
        path = self.entry(sha256, name)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._install(source, path, sha256)

    def size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used entries until the cache fits its cap."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".evict.lock"), timeout=600):
            for stale in self.objects.glob("*/.incoming-*"):  # downloads of killed processes (live ones keep writing)
                with contextlib.suppress(FileNotFoundError):
                    if stale.stat().st_mtime < time.time() - STALE_INCOMING_S:
                        stale.unlink()
            entries = sorted(self._entries(), key=lambda e: e[2])  # oldest use first
            total = sum(size for _, size, _ in entries)
            recent = time.time() - GRACE_S
            for path, size, used in entries:
                if total <= self.cap:
                    break
                if path != keep and used < recent:
                    self._drop(path)
                    total -= size

    def _install(self, source: Path, path: Path, sha256: str) -> None:
        stamps = Stamps(_sidecar(path))
        os.replace(source, path)
        stamps.record(_DATA, stat_stamp(path), sha256)
        stamps.save()
        self.evict(keep=path)

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(data file, bytes, last use) of every entry."""
        entries = []
        for path in self.objects.glob("*/*"):
            if path.name.endswith(".stamp") or path.name.startswith("."):
                continue
            try:
                size = path.stat().st_size
                used = _sidecar(path).stat().st_mtime if _sidecar(path).exists() else path.stat().st_mtime
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            entries.append((path, size, used))
        return entries

    @staticmethod
    def _drop(path: Path) -> None:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
