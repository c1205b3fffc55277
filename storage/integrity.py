"""Is a file still what its manifest says? sha256 against the manifest, hashed once per change.

A stamp records a file's (size, mtime_ns, ctime_ns, inode, device) at the moment its sha256 was
found equal to the manifest's. A file whose stat still equals its stamp is the file that was
hashed: writing to it changes mtime and ctime, and ctime cannot be set back (so `touch -d` or
`cp --preserve` do not fool it). Stamps live in a small JSON sidecar next to the files; a
missing, stale or unwritable sidecar only costs a re-hash.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from storage.files import sha256_file

STAMPS = ".verified.json"


@dataclass
class Stats:
    """Time spent verifying in this process (benchmarks read it)."""

    seconds: float = 0.0
    files: int = 0
    hashed_bytes: int = 0


STATS = Stats()


class Damaged(Exception):
    """A file does not match its manifest entry; the message names the file and what differs."""


def stat_stamp(path: str | os.PathLike) -> dict:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def mismatch(what: str, got_bytes: int | None, got_sha256: str | None, meta: dict) -> str:
    """One line: how `what` differs from its manifest entry (missing, size or sha256)."""
    if got_bytes is None:
        return f"{what} is missing"
    if got_bytes != meta["bytes"]:
        return f"{what} has {got_bytes:,} bytes, its manifest says {meta['bytes']:,}"
    return f"{what} has sha256 {got_sha256}, its manifest says {meta['sha256']}"


class Stamps:
    """The stamps of the files in one directory, keyed by file name, saved in `sidecar`."""

    def __init__(self, sidecar: Path):
        self.sidecar = sidecar
        self._dirty = False
        try:
            self._stamps = json.loads(sidecar.read_text(encoding="utf-8"))
            if not isinstance(self._stamps, dict):
                self._stamps = {}
        except (OSError, ValueError):
            self._stamps = {}

    def check(self, name: str, path: Path, meta: dict, full: bool = False) -> None:
        """Raise Damaged unless the file at `path` has the manifest's size and sha256.

        Hashes only when the file changed since its last stamp, or always with full=True.
        """
        started = time.perf_counter()
        try:
            try:
                stamp = stat_stamp(path)
            except FileNotFoundError:
                raise Damaged(mismatch(str(path), None, None, meta)) from None
            if stamp["bytes"] != meta["bytes"]:
                raise Damaged(mismatch(str(path), stamp["bytes"], None, meta))
            if not full and self._stamps.get(name) == {**stamp, "sha256": meta["sha256"]}:
                return
            got = sha256_file(path)
            STATS.hashed_bytes += stamp["bytes"]
            if got != meta["sha256"]:
                self.forget(name)
                raise Damaged(mismatch(str(path), stamp["bytes"], got, meta))
            if stat_stamp(path) == stamp:  # unchanged while it was hashed
                self.record(name, stamp, meta["sha256"])
        finally:
            STATS.seconds += time.perf_counter() - started
            STATS.files += 1

    def record(self, name: str, stamp: dict, sha256: str) -> None:
        self._stamps[name] = {**stamp, "sha256": sha256}
        self._dirty = True

    def forget(self, name: str) -> None:
        self._dirty |= self._stamps.pop(name, None) is not None

    def save(self) -> None:
        if not self._dirty:
            return
        tmp = self.sidecar.with_name(f"{self.sidecar.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self._stamps), encoding="utf-8")
            os.replace(tmp, self.sidecar)  # atomic: a reader sees old or new stamps
            self._dirty = False
        except OSError:  # a read-only data home: verification still works, it just hashes again next time
            tmp.unlink(missing_ok=True)
