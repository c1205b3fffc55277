"""The artifact store: content-keyed directories, published atomically, described by manifest.json.

Layout: <root>/<step>/<key>/{files..., manifest.json}. A directory counts only when its
manifest is present and every file it lists has the listed size, so a half-written or
tampered artifact is never trusted. Locally a directory is built in a temporary sibling
and renamed into place under a file lock; on an object store (s3://, gs:// through
pyarrow.fs) it is built locally, uploaded, and the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock
from pydantic import BaseModel, ConfigDict

from storage.errors import PipelineError, UsageError
from storage.files import Staging, parquet_head, parquet_rows, read_json, sha256_file, write_json
from storage.home import data_home, is_uri
from storage.schemas import check_schema

MANIFEST = "manifest.json"
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
    """Artifacts under one root: a local directory or an object-store URI."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = data_home(root)
        self.remote = is_uri(self.root)
        if self.remote:
            self.fs, self._base = pafs.FileSystem.from_uri(self.root)
            # Local mirror of remote artifacts, and where locks live (locks are per host).
            self.local_root = Path(tempfile.gettempdir()) / "newsgroups-lstm" / hashlib.sha256(self.root.encode()).hexdigest()[:12]
        else:
            self.fs, self._base = pafs.LocalFileSystem(), self.root
            self.local_root = Path(self.root)

    # -- addressing ---------------------------------------------------------------------------
    def uri(self, step: str, key: str) -> str:
        return f"{self.root}/{step}/{key}"

    def _path(self, step: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self._base, step, key, name) if p)

    # -- reading ------------------------------------------------------------------------------
    def read_manifest(self, ref_or_step: ArtifactRef | str, key: str | None = None) -> dict | None:
        step, key = (ref_or_step.step, ref_or_step.key) if isinstance(ref_or_step, ArtifactRef) else (ref_or_step, key)
        try:
            with self.fs.open_input_stream(self._path(step, key, MANIFEST), compression=None) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def find(self, step: str, key: str, verify: bool = False) -> ArtifactRef | None:
        """The artifact if it is complete: manifest present, every listed file of the listed size.

        verify=True also re-hashes every file (sha256) against the manifest.
        """
        manifest = self.read_manifest(step, key)
        if manifest is None:
            return None
        files = manifest.get("files", {})
        infos = self.fs.get_file_info([self._path(step, key, name) for name in files])
        for (name, meta), info in zip(files.items(), infos):
            if info.type != pafs.FileType.File or info.size != meta["bytes"]:
                return None
        if verify:
            local = self.local_dir(ArtifactRef(step=step, key=key, uri=self.uri(step, key)))
            if any(sha256_file(local / name) != meta["sha256"] for name, meta in files.items()):
                return None
        return ArtifactRef(step=step, key=key, uri=self.uri(step, key), rows=manifest.get("rows"))

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local directory holding the artifact's files (the artifact itself when the store is local)."""
        if not self.remote:
            return Path(self._path(ref.step, ref.key))
        target = self.local_root / ref.step / ref.key
        if not (target / MANIFEST).exists():
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{ref.key}-", dir=_ensure_dir(target.parent)))
            manifest = self.read_manifest(ref) or {}
            for name in [*manifest.get("files", {}), MANIFEST]:
                with self.fs.open_input_stream(self._path(ref.step, ref.key, name), compression=None) as src, \
                        open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            _rename_into_place(staging, target)
        return target

    def local_file(self, ref: ArtifactRef, name: str) -> Path:
        """A local path of one file of the artifact (for readers that need a path: zip, tar, Keras)."""
        return self.local_dir(ref) / name

    def only_file(self, ref: ArtifactRef) -> Path:
        """The local path of the one file an artifact holds (a download)."""
        names = list((self.read_manifest(ref) or {}).get("files", {}))
        if len(names) != 1:
            raise PipelineError(f"{ref.uri}: expected exactly one file, found {names}")
        return self.local_file(ref, names[0])

    def read_parquet(self, ref: ArtifactRef, name: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file of an artifact, refusing it if its schema is not `schema`."""
        path = self._path(ref.step, ref.key, name)
        check_schema(pq.read_schema(path, filesystem=self.fs), schema, ref.file(name))
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def iter_batches(self, ref: ArtifactRef, name: str, schema: pa.Schema, columns: list[str] | None = None,
                     batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Record batches of one Parquet file of an artifact (memory: one batch), schema checked first."""
        parquet = pq.ParquetFile(self._path(ref.step, ref.key, name), filesystem=self.fs)
        check_schema(parquet.schema_arrow, schema, ref.file(name))
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)

    def parquet_schema(self, ref: ArtifactRef, name: str) -> pa.Schema:
        return pq.read_schema(self._path(ref.step, ref.key, name), filesystem=self.fs)

    def parquet_head(self, ref: ArtifactRef, name: str, rows: int) -> tuple[int, pa.Schema, pa.Table | None]:
        return parquet_head(self.local_file(ref, name), rows)

    def read_json(self, ref: ArtifactRef, name: str) -> Any:
        return read_json(self.local_file(ref, name))

    def read_npy(self, ref: ArtifactRef, name: str) -> np.ndarray:
        return np.load(self.local_file(ref, name))

    def list(self) -> list[dict]:
        """Every complete artifact's manifest (for `inspect`), oldest first."""
        manifests = []
        selector = pafs.FileSelector(self._base, recursive=False, allow_not_found=True)
        for step_info in self.fs.get_file_info(selector):
            if step_info.type != pafs.FileType.Directory or step_info.base_name.startswith("."):
                continue
            sub = pafs.FileSelector(step_info.path, recursive=False)
            for info in self.fs.get_file_info(sub):
                if info.type == pafs.FileType.Directory and not info.base_name.startswith("."):
                    manifest = self.read_manifest(step_info.base_name, info.base_name)
                    if manifest is not None:
                        manifests.append(manifest)
        return sorted(manifests, key=lambda m: m.get("created", ""))

    def latest(self, step: str) -> dict | None:
        """The manifest of the newest complete artifact of `step`, or None."""
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
    def _url_record(self, url: str) -> str:
        return "/".join((self._base, ".urls", hashlib.sha256(url.encode()).hexdigest()[:20] + ".json"))

    def seen_sha256(self, url: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._url_record(url), compression=None) as f:
                return json.loads(f.read())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_sha256(self, url: str, sha256: str) -> None:
        self.fs.create_dir(self._url_record(url).rsplit("/", 1)[0], recursive=True)
        _put_atomic(self.fs, self._url_record(url), json.dumps({"url": url, "sha256": sha256}).encode())

    def forget_url(self, url: str) -> bool:
        """Drop what an unpinned URL was recorded to give, so the next run fetches it again; True if recorded."""
        try:
            self.fs.delete_file(self._url_record(url))
        except (FileNotFoundError, OSError):
            return False
        return True

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def lock(self, step: str, key: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        lock_dir = _ensure_dir(self.local_root / ".locks")
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
        (e.g. {"rows": n, "stats": {...}}). The directory appears under its final name only
        once complete, so concurrent or killed runs never expose half an artifact.
        """
        if ref := self.find(step, key):
            return ref
        with self.lock(step, key):
            if ref := self.find(step, key):  # another process finished it while we waited
                return ref
            step_dir = _ensure_dir((self.local_root if self.remote else Path(self.root)) / step)
            for stale in step_dir.glob(f".tmp-{key}-*"):  # leftovers of killed runs; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=step_dir))
            started = time.time()
            try:
                extra = dict(build(Staging(staging)) or {})
                manifest = _manifest(step, key, version, params, upstream, staging, started, extra)
                write_json(staging / MANIFEST, manifest)
                if self.remote:
                    self._upload(staging, step, key, manifest)
                    shutil.rmtree(staging, ignore_errors=True)
                else:
                    _rename_into_place(staging, step_dir / key)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        ref = self.find(step, key)
        if ref is None:
            raise PipelineError(f"artifact {self.uri(step, key)} vanished right after it was published")
        return ref

    def work_dir(self, step: str, key: str) -> Path:
        """A private local scratch directory that survives a killed or retried attempt.

        For resumable work before publish: a download's *.part file, training checkpoints.
        Never read as an artifact; delete it with discard_work once the artifact is published.
        """
        return _ensure_dir((self.local_root if self.remote else Path(self.root)) / step / f".work-{key}")

    def discard_work(self, step: str, key: str) -> None:
        shutil.rmtree((self.local_root if self.remote else Path(self.root)) / step / f".work-{key}", ignore_errors=True)

    def remove(self, step: str, key: str) -> None:
        with self.lock(step, key):
            self.fs.delete_dir(self._path(step, key))

    def _upload(self, staging: Path, step: str, key: str, manifest: dict) -> None:
        self.fs.create_dir(self._path(step, key), recursive=True)
        for name in [*manifest["files"], MANIFEST]:  # the manifest last: it is what makes the artifact count
            with open(staging / name, "rb") as src, \
                    self.fs.open_output_stream(self._path(step, key, name), compression=None) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


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


def _put_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file so a reader sees the old content or the new, never a part (a rename locally;
    a single PUT is already atomic on an object store)."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{os.getpid()}.tmp"
        with fs.open_output_stream(tmp, compression=None) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rename_into_place(staging: Path, final: Path) -> None:
    """Atomically move a complete directory to its final name, setting aside an invalid leftover."""
    if final.exists():  # an incomplete or tampered artifact (callers checked it is not valid)
        final.rename(final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}"))
        for trash in final.parent.glob(f".trash-{final.name}-*"):
            shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, final)
