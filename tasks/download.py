"""Step "downloads": one source file, verified, stored as downloads/<sha256>/<name>.

The artifact key is the file's sha256: known up front for a pinned source, otherwise the
sha256 this data home saw the last time it fetched that URL (a small index under
downloads/.urls/). So a cached file is returned without any network work, and an unpinned
override records what it fetched. An unpinned URL is fetched once per data home; to pick up
a changed upstream file, pin its new sha256 (or delete the artifact).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.download import Fetched, fetch
from storage.errors import PipelineError
from tasks.common import step_logger, step_task
from tasks.config import Source

STEP = "downloads"
VERSION = 1


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:20]


def _index_path(store: ArtifactStore, url: str) -> Path:
    return store.local_root / STEP / ".urls" / f"{url_hash(url)}.json"


def _seen_sha256(store: ArtifactStore, url: str) -> str | None:
    try:
        return json.loads(_index_path(store, url).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_sha256(store: ArtifactStore, url: str, sha256: str) -> None:
    path = _index_path(store, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"url": url, "sha256": sha256}))
    os.replace(tmp, path)  # atomic: a reader sees the old index or the new one


def download_key(source: Source, data_home: str | None = None) -> str | None:
    """The artifact key of `source`: its pinned sha256, else the one last seen for its URL, else None."""
    if source.sha256:
        return source.sha256.lower()
    return _seen_sha256(ArtifactStore(data_home), source.url)


@step_task("download")
def download(source: Source, data_home: str | None = None) -> ArtifactRef:
    """Fetch `source` (trying its mirrors) unless a verified copy is already in the store."""
    store = ArtifactStore(data_home)
    logger = step_logger()
    key = download_key(source, data_home)
    if key and (ref := store.find(STEP, key)):
        return ref
    work = store.work_dir(STEP, url_hash(source.url))
    with store.lock(STEP, f"fetch-{url_hash(source.url)}"):  # one fetcher per URL writes the .part
        key = download_key(source, data_home)
        if key and (ref := store.find(STEP, key)):
            return ref
        logger.info("downloading %s", source.url)
        got: Fetched = fetch([source.url, *source.mirrors], work / source.name, sha256=source.sha256, size=source.size)
        logger.info("downloaded %s: %s bytes, sha256 %s", got.url, f"{got.size:,}", got.sha256)

        def build(staging: Path) -> dict:
            os.replace(got.path, staging / source.name)
            return {"sha256": got.sha256, "url": got.url, "pinned": source.sha256 is not None, "bytes": got.size}

        ref = store.publish(STEP, got.sha256, build, version=VERSION,
                            params={"url": source.url, "name": source.name, "sha256": source.sha256})
        if source.sha256 is None:
            _record_sha256(store, source.url, got.sha256)
        store.discard_work(STEP, url_hash(source.url))
    return ref


def downloaded_file(ref: ArtifactRef, data_home: str | None = None) -> Path:
    """The local path of the one file a download artifact holds."""
    store = ArtifactStore(data_home)
    manifest = store.read_manifest(ref) or {}
    names = list(manifest.get("files", {}))
    if len(names) != 1:
        raise PipelineError(f"{ref.uri}: expected exactly one downloaded file, found {names}")
    return store.local_dir(ref) / names[0]
