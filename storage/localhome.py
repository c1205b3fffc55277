"""A data home on a local (or mounted) file system.

    <step>/<key>/{files..., manifest.json}      the artifact, renamed into place complete
    <step>/<key>/.verified.json                 stamps of the files whose sha256 was checked (storage.integrity)
    <step>/.quarantine/<key>-<time>/            a damaged artifact, moved aside (never deleted)

Every file is checked against the manifest's size and sha256 before it counts or is read; the
stamps make that a stat() for a file that has not changed since it was last hashed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from storage.errors import StoreUnavailable
from storage.files import write_json
from storage.home import MANIFEST
from storage.integrity import STAMPS, Stamps, stat_stamp


class LocalHome:
    """The storage side of ArtifactStore for a local directory."""

    remote = False

    def __init__(self, root: str):
        self.root = root
        self.scratch = Path(root)  # staging, work dirs and locks live in the home itself

    # -- small files and listing ------------------------------------------------------------------
    def _abs(self, rel: str) -> Path:
        return Path(self.root, rel)

    def read(self, rel: str) -> bytes | None:
        try:
            return self._abs(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, rel: str, data: bytes) -> None:
        """Write a small file so a reader sees the old content or the new, never a part."""
        path = self._abs(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def delete(self, rel: str) -> bool:
        """Delete a small file; True if it was there."""
        try:
            self._abs(rel).unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_tree(self, rel: str) -> None:
        shutil.rmtree(self._abs(rel), ignore_errors=True)

    def children(self, rel: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._abs(rel)) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def file_uri(self, step: str, key: str, name: str, meta: dict) -> str:
        return str(self._abs(f"{step}/{key}/{name}"))

    # -- checking and reading artifacts ------------------------------------------------------------
    def verify(self, step: str, key: str, manifest: dict, full: bool = False) -> None:
        """Raise Damaged unless every listed file has its size and sha256 (hashing only changed files,
        or all with full=True)."""
        directory = self._abs(f"{step}/{key}")
        stamps = Stamps(directory / STAMPS)
        try:
            for name, meta in manifest.get("files", {}).items():
                stamps.check(name, directory / name, meta, full)
        finally:
            stamps.save()

    def path(self, step: str, key: str, name: str, meta: dict) -> Path:
        directory = self._abs(f"{step}/{key}")
        stamps = Stamps(directory / STAMPS)
        try:
            stamps.check(name, directory / name, meta)
        finally:
            stamps.save()
        return directory / name

    def directory(self, step: str, key: str, paths: dict[str, Path]) -> Path:
        return self._abs(f"{step}/{key}")

    # -- publishing ---------------------------------------------------------------------------------
    def commit(self, step: str, key: str, staging: Path, manifest: dict) -> bool:
        """Rename the complete staging directory into place (the caller holds the artifact's lock)."""
        write_json(staging / MANIFEST, manifest)
        final = self._abs(f"{step}/{key}")
        if final.exists():  # a directory without a valid manifest (callers checked): set it aside, never delete it
            self.quarantine(step, key)
        os.rename(staging, final)
        stamps = Stamps(final / STAMPS)
        for name, meta in manifest["files"].items():  # just hashed by the caller: readers need not hash again
            stamps.record(name, stat_stamp(final / name), meta["sha256"])
        stamps.save()
        return True

    def quarantine(self, step: str, key: str) -> str:
        source = self._abs(f"{step}/{key}")
        target = self._abs(f"{step}/.quarantine/{key}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        if target.exists():
            target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:6]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
        return str(target)

    def check(self) -> None:
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise StoreUnavailable(f"data home {root} is not a directory (set NEWSGROUPS_LSTM_HOME or --data-home)")

