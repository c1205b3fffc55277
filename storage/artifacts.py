"""The artifact store: content-keyed artifacts, published atomically, described by manifest.json.

An artifact is <root>/<step>/<key>/: the files a step built and manifest.json (step, version,
params, upstream keys, and per file its bytes and sha256). It counts only when its manifest is
there and its files match it; a damaged one is moved to <step>/.quarantine/ with a warning and
its step builds it again. The root is a local directory (storage.localhome: renamed into place
under a file lock, sha256 checked with stamps) or an object-store URI (storage.objectstore:
uploaded per attempt, made visible by a create-only manifest, read through a local cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from pydantic import BaseModel, ConfigDict

from storage.errors import DamagedArtifact, PipelineError, UsageError
from storage.files import Staging, parquet_head, parquet_rows, read_json, sha256_file
from storage.home import MANIFEST, data_home, is_uri
from storage.integrity import Damaged
from storage.localhome import LocalHome
from storage.objectstore import ObjectHome
from storage.schemas import check_schema

log = logging.getLogger("newsgroups_lstm.progress")  # = tasks.step.PROGRESS_LOGGER: the CLI prints it

LOCK_TIMEOUT_S = 6 * 3600  # a lock is an flock: the kernel frees it when its holder dies
_TRACKED_LIBRARIES = ("prefect", "keras", "tensorflow", "jax", "torch", "numpy", "pyarrow", "pandas")


class ArtifactRef(BaseModel):
    """What a step returns: a small, JSON-serialisable pointer to bytes in the store."""

    model_config = ConfigDict(frozen=True)

    step: str
    key: str
    uri: str  # the artifact directory (local path or object-store URI)
    rows: int | None = None

    def file(self, name: str) -> str:
        return f"{self.uri}/{name}"


def artifact_key(step: str, version: int, params: Mapping[str, Any], upstream: Sequence[ArtifactRef] = ()) -> str:
    """Hash of (step, step version, the step's own params, upstream keys): same inputs, same key."""
    payload = json.dumps(
        {"step": step, "version": version, "params": params, "upstream": [[u.step, u.key] for u in upstream]},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class ArtifactStore:
    """Artifacts under one root: a local directory (storage.localhome) or an object-store URI (storage.objectstore)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = data_home(root)
        self.remote = is_uri(self.root)
        self.backend = ObjectHome(self.root) if self.remote else LocalHome(self.root)
        self._manifests: dict[tuple[str, str], dict] = {}  # read once per store: an artifact never changes

    def check(self) -> None:
        """Fail fast, with one line naming the endpoint or path, if the data home cannot be used."""
        self.backend.check()

    def uri(self, step: str, key: str) -> str:
        return f"{self.root}/{step}/{key}"

    # -- finding --------------------------------------------------------------------------------------
    def read_manifest(self, ref_or_step: ArtifactRef | str, key: str | None = None) -> dict | None:
        step, key = (ref_or_step.step, ref_or_step.key) if isinstance(ref_or_step, ArtifactRef) else (ref_or_step, key)
        data = self.backend.read(f"{step}/{key}/{MANIFEST}")
        try:
            manifest = json.loads(data) if data is not None else None
        except ValueError:  # hand-edited: not an artifact this code wrote
            return None
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None

    def find(self, step: str, key: str, verify: bool = False) -> ArtifactRef | None:
        """The artifact if it is there and sound, else None. A damaged one is moved to quarantine.

        Sound: locally, every listed file has its size and sha256 (hashed when it changed since its last
        check; verify=True hashes all); on an object store, every listed object has its size (only the
        manifest is read; contents are hashed as they are downloaded, or with verify=True).
        """
        return self._find(step, key, verify=verify)

    def _find(self, step: str, key: str, verify: bool = False, locked: bool = False) -> ArtifactRef | None:
        manifest = self.read_manifest(step, key)
        if manifest is None:
            return None
        try:
            self.backend.verify(step, key, manifest, full=verify)
        except Damaged as exc:
            self._quarantine(step, key, exc, locked=locked)
            return None
        self._manifests[(step, key)] = manifest
        return ArtifactRef(step=step, key=key, uri=self.uri(step, key), rows=manifest.get("rows"))

    def _quarantine(self, step: str, key: str, damage: Damaged, locked: bool = False) -> str | None:
        """Move a damaged artifact aside (under its lock, after re-hashing it: another process may have rebuilt it)."""
        self._manifests.pop((step, key), None)
        with contextlib.nullcontext() if locked else self.lock(step, key):
            manifest = self.read_manifest(step, key)
            if manifest is None:
                return None  # another process moved it already
            try:
                self.backend.verify(step, key, manifest, full=True)
                return None  # rebuilt meanwhile
            except Damaged as exc:
                damage = exc
            where = self.backend.quarantine(step, key)
        log.warning("%s/%s is damaged: %s; moved to %s and will be rebuilt", step, key, damage, where)
        return where

    def verify(self, target: str | None = None) -> tuple[int, list[tuple[str, str, str]]]:
        """Re-hash every file of every artifact (or of one step or step/key), ignoring stamps; move the damaged
        ones to quarantine. Returns (artifacts checked, [(step/key, what is wrong, where it was moved)])."""
        step, _, prefix = (target or "").strip("/").partition("/")
        damaged, checked = [], 0
        for found_step, key in self._keys():
            if (step and found_step != step) or not key.startswith(prefix):
                continue
            manifest = self.read_manifest(found_step, key)
            if manifest is None:  # not an artifact (no manifest): never read, set aside by the next publish
                continue
            checked += 1
            try:
                self.backend.verify(found_step, key, manifest, full=True)
            except Damaged as exc:
                with self.lock(found_step, key):
                    where = self.backend.quarantine(found_step, key)
                damaged.append((f"{found_step}/{key}", str(exc), where))
        return checked, damaged

    # -- reading ----------------------------------------------------------------------------------------
    def _manifest(self, ref: ArtifactRef) -> dict:
        manifest = self._manifests.get((ref.step, ref.key)) or self.read_manifest(ref)
        if manifest is None:
            raise PipelineError(f"artifact {ref.uri} is gone (no {MANIFEST}); run the pipeline again to rebuild it")
        self._manifests[(ref.step, ref.key)] = manifest
        return manifest

    def local_file(self, ref: ArtifactRef, name: str) -> Path:
        """A local path of one file of the artifact, checked against its manifest (an object store's file comes
        from the host's object cache). A damaged file is never returned: its artifact goes to quarantine."""
        meta = self._manifest(ref)["files"].get(name)
        if meta is None:
            raise PipelineError(f"artifact {ref.uri} has no file {name} (it has {', '.join(self._manifest(ref)['files'])})")
        try:
            return self.backend.path(ref.step, ref.key, name, meta)
        except Damaged as exc:
            self._quarantine(ref.step, ref.key, exc)
            raise DamagedArtifact(f"{exc}; artifact {ref.step}/{ref.key} was moved to quarantine, "
                                  "run the pipeline again to rebuild it") from None

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local directory holding the artifact's files by name (for readers that want one: predict)."""
        paths = {name: self.local_file(ref, name) for name in self._manifest(ref)["files"]}
        return self.backend.directory(ref.step, ref.key, paths)

    def only_file(self, ref: ArtifactRef) -> Path:
        """The local path of the one file an artifact holds (a download)."""
        names = list(self._manifest(ref)["files"])
        if len(names) != 1:
            raise PipelineError(f"{ref.uri}: expected exactly one file, found {names}")
        return self.local_file(ref, names[0])

    def read_parquet(self, ref: ArtifactRef, name: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file of an artifact, refusing it if its schema is not `schema`."""
        path = self.local_file(ref, name)
        check_schema(pq.read_schema(path), schema, ref.file(name))
        return pq.read_table(path, columns=columns)

    def iter_batches(self, ref: ArtifactRef, name: str, schema: pa.Schema, columns: list[str] | None = None,
                     batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Record batches of one Parquet file of an artifact (memory: one batch), schema checked first."""
        parquet = pq.ParquetFile(self.local_file(ref, name))
        check_schema(parquet.schema_arrow, schema, ref.file(name))
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)

    def parquet_schema(self, ref: ArtifactRef, name: str) -> pa.Schema:
        return pq.read_schema(self.local_file(ref, name))

    def parquet_head(self, ref: ArtifactRef, name: str, rows: int) -> tuple[int, pa.Schema, pa.Table | None]:
        return parquet_head(self.local_file(ref, name), rows)

    def read_json(self, ref: ArtifactRef, name: str) -> Any:
        return read_json(self.local_file(ref, name))

    def read_npy(self, ref: ArtifactRef, name: str) -> np.ndarray:
        return np.load(self.local_file(ref, name))

    # -- listing -----------------------------------------------------------------------------------------
    def _keys(self) -> Iterator[tuple[str, str]]:
        for step in self.backend.children(""):
            if not step.startswith("."):
                yield from ((step, key) for key in self.backend.children(step) if not key.startswith("."))

    def list(self) -> list[dict]:
        """Every artifact's manifest (for `inspect`), oldest first."""
        manifests = [m for step, key in self._keys() if (m := self.read_manifest(step, key)) is not None]
        return sorted(manifests, key=lambda m: m.get("created", ""))

    def latest(self, step: str) -> dict | None:
        """The manifest of the newest artifact of `step`, or None."""
        manifests = [m for m in self.list() if m["step"] == step]
        return manifests[-1] if manifests else None

    def resolve(self, target: str) -> ArtifactRef:
        """The artifact named by `step/key` (a unique key prefix is enough), a bare key, or a local artifact path."""
        path = Path(target)
        if not self.remote and path.exists():
            directory = path if path.is_dir() else path.parent
            if not (directory / MANIFEST).is_file():
                raise UsageError(f"{target} is not an artifact directory (no {MANIFEST})")
            manifest = read_json(directory / MANIFEST)
            step, key = manifest["step"], manifest["key"]
        else:
            step, _, prefix = target.strip("/").rpartition("/")
            matches = [(m["step"], m["key"]) for m in self.list()
                       if (not step or m["step"] == step) and m["key"].startswith(prefix)]
            if not matches:
                raise UsageError(f"no artifact {target!r} in {self.root} (list them with `newsgroups-lstm inspect`)")
            if len(matches) > 1:
                raise UsageError(f"{target!r} is ambiguous: " + ", ".join(f"{s}/{k}" for s, k in matches[:5]))
            (step, key), = matches
        ref = self.find(step, key)
        if ref is None:
            raise UsageError(f"artifact {step}/{key} is incomplete or damaged in {self.root}")
        return ref

    def lineage(self, step: str, key: str) -> Iterator[tuple[int, str, str, dict | None]]:
        """(depth, step, key, manifest or None if missing) from an artifact down to the downloads, depth first;
        an artifact reached twice is yielded again without its upstream."""
        seen: set[tuple[str, str]] = set()

        def walk(step: str, key: str, depth: int) -> Iterator[tuple[int, str, str, dict | None]]:
            manifest = self.read_manifest(step, key)
            yield depth, step, key, manifest
            if (step, key) not in seen:  # a shared upstream is walked once
                seen.add((step, key))
                for up in (manifest or {}).get("upstream", []):
                    yield from walk(up["step"], up["key"], depth + 1)

        yield from walk(step, key, 0)

    # -- the URL index: which sha256 an unpinned URL gave (so a cached download needs no network) ----
    @staticmethod
    def _url_record(url: str) -> str:
        return f".urls/{hashlib.sha256(url.encode()).hexdigest()[:20]}.json"

    def seen_sha256(self, url: str) -> str | None:
        try:
            return json.loads(self.backend.read(self._url_record(url)) or b"null")["sha256"]
        except (ValueError, KeyError, TypeError):
            return None

    def record_sha256(self, url: str, sha256: str) -> None:
        self.backend.write(self._url_record(url), json.dumps({"url": url, "sha256": sha256}).encode())

    def forget_url(self, url: str) -> bool:
        """Drop what an unpinned URL was recorded to give, so the next run fetches it again; True if recorded."""
        return self.backend.delete(self._url_record(url))

    # -- writing ------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, step: str, key: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        lock_dir = _ensure_dir(self.backend.scratch / ".locks")
        with FileLock(str(lock_dir / f"{step}-{key}.lock"), timeout=timeout):
            yield

    def publish(
        self,
        step: str,
        key: str,
        build: Callable[[Staging], Mapping[str, Any] | None],
        *,
        version: int,
        params: Mapping[str, Any],
        upstream: Sequence[ArtifactRef] = (),
    ) -> ArtifactRef:
        """Return the artifact (step, key), building it with build(staging) if it is not there yet.

        build writes its files into the Staging directory and may return extra manifest fields
        (e.g. {"rows": n, "stats": {...}}). The artifact appears only once complete, so concurrent or
        killed runs never expose half an artifact; on an object store the first of several hosts to
        publish wins and the others return its artifact.
        """
        if ref := self.find(step, key):
            return ref
        with self.lock(step, key):
            if ref := self._find(step, key, locked=True):  # another process finished it while we waited
                return ref
            step_dir = _ensure_dir(self.backend.scratch / step)
            for stale in step_dir.glob(f".tmp-{key}-*"):  # leftovers of killed runs; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=step_dir))
            started = time.time()
            try:
                extra = dict(build(Staging(staging)) or {})
                manifest = _manifest(step, key, version, params, upstream, staging, started, extra)
                if not self.backend.commit(step, key, staging, manifest):
                    log.info("%s/%s: another host published it first; using its artifact", step, key)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        ref = self.find(step, key)
        if ref is None:
            raise PipelineError(f"artifact {self.uri(step, key)} vanished right after it was published")
        return ref

    def work_dir(self, step: str, key: str) -> Path:
        """A private local scratch directory that survives a killed or retried attempt.

        For resumable work before publish: a download's *.part file, training checkpoints.
        Never read as an artifact; delete it with discard_work once the artifact is published.
        """
        return _ensure_dir(self.backend.scratch / step / f".work-{key}")

    def remove(self, step: str, key: str) -> None:
        """Delete an artifact (e.g. the shards a step has joined, once that step is published)."""
        with self.lock(step, key):
            self.backend.delete_tree(f"{step}/{key}")

    def discard_work(self, step: str, key: str) -> None:
        shutil.rmtree(self.backend.scratch / step / f".work-{key}", ignore_errors=True)


def _manifest(step, key, version, params, upstream, staging: Path, started: float, extra: dict) -> dict:
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = path.relative_to(staging).as_posix()
        entry = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        if name.endswith(".parquet"):
            entry["rows"] = parquet_rows(path)
        files[name] = entry
    finished = time.time()
    return {
        "step": step,
        "key": key,
        "version": version,
        "params": params,
        "upstream": [{"step": u.step, "key": u.key, "uri": u.uri} for u in upstream],
        "rows": extra.pop("rows", None),
        "files": files,
        "libraries": library_versions(),
        "host": socket.gethostname(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(finished - started, 3),
        **extra,
    }


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
