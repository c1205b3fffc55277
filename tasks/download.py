"""Step "downloads": one source file, verified, stored as downloads/<sha256>/<name>.

The artifact key is the file's sha256: known up front for a pinned source, otherwise the
sha256 this data home saw the last time it fetched that URL (a small index under
downloads/.urls/). So a cached file is returned without any network work, and an unpinned
override records what it fetched. An unpinned URL is fetched once per data home; to pick up
a changed upstream file, pin its new sha256 (or delete the artifact).
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.download import Fetched, downloaded_file, fetch, forget_download, record_sha256, seen_sha256, url_hash
from tasks.common import step_logger, step_task
from tasks.config import Source

__all__ = ["STEP", "VERSION", "download", "download_key", "downloaded_file", "forget_download", "url_hash"]

STEP = "downloads"  # storage.download.URL_INDEX lives under this step's directory
VERSION = 1


def download_key(source: Source, data_home: str | None = None) -> str | None:
    """The artifact key of `source`: its pinned sha256, else the one last seen for its URL, else None."""
    if source.sha256:
        return source.sha256.lower()
    return seen_sha256(data_home, source.url)


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
        got: Fetched = fetch([source.url, *source.mirrors], work / source.name, sha256=source.sha256, size=source.size,
                             require_archive=True)  # an unpinned URL is recorded only for a real archive
        logger.info("downloaded %s: %s bytes, sha256 %s", got.url, f"{got.size:,}", got.sha256)

        def build(staging: Path) -> dict:
            os.replace(got.path, staging / source.name)
            return {"sha256": got.sha256, "url": got.url, "pinned": source.sha256 is not None, "bytes": got.size}

        ref = store.publish(STEP, got.sha256, build, version=VERSION,
                            params={"url": source.url, "name": source.name, "sha256": source.sha256})
        if source.sha256 is None:
            record_sha256(data_home, source.url, got.sha256)
        store.discard_work(STEP, url_hash(source.url))
    return ref

