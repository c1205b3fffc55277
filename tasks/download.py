"""Step "download": one source file, verified, stored as download/<sha256>/<name>.

The artifact key is the file's sha256: known up front for a pinned source, otherwise the
sha256 this data home saw the last time it fetched that URL (the store's URL index). So a
cached file is returned without any network work, and an unpinned override records what it
fetched. An unpinned URL is fetched once per data home; to pick up a changed upstream file,
pin its new sha256 (or delete the artifact).
"""

from __future__ import annotations

import hashlib

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.download import Fetched, fetch
from storage.files import Staging
from storage.tables import table_format
from tasks.config import Source
from tasks.progress import Reporter
from tasks.step import Step, step_logger

STEP = Step("download", version=1)


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:20]


def download_key(source: Source, store: ArtifactStore) -> str | None:
    """The artifact key of `source`: its pinned sha256, else the one last seen for its URL, else None."""
    return source.sha256.lower() if source.sha256 else store.seen_sha256(source.url)


@STEP.task(task_run_name="download-{source.name}")
def download(source: Source, data_home: str | None = None) -> ArtifactRef:
    """Fetch `source` (trying its mirrors) unless a verified copy is already in the store."""
    store = ArtifactStore(data_home)
    if cached := STEP.cached(store, download_key(source, store)):
        return cached
    work = store.work_dir(STEP.name, url_hash(source.url))
    with store.lock(STEP.name, f"fetch-{url_hash(source.url)}"):  # one fetcher per URL writes the .part
        if cached := STEP.cached(store, download_key(source, store)):
            return cached
        step_logger().info("downloading %s", source.url)
        with Reporter(f"download-{source.name}", "B") as reporter:
            got: Fetched = fetch([source.url, *source.mirrors], work / source.name, sha256=source.sha256,
                                 size=source.size, progress=lambda done, total: reporter.update(done, total),
                                 # an unpinned URL is recorded only for a real archive (a table has no magic bytes)
                                 require_archive=table_format(source.name) is None)
        step_logger().info("downloaded %s: %s bytes, sha256 %s", got.url, f"{got.size:,}", got.sha256)

        def build(staging: Staging) -> dict:
            staging.move_in(source.name, got.path)
            return {"sha256": got.sha256, "url": got.url, "pinned": source.sha256 is not None, "bytes": got.size}

        ref = store.publish(STEP.name, got.sha256, build, version=STEP.version,
                            params={"url": source.url, "name": source.name, "sha256": source.sha256})
        if source.sha256 is None:
            store.record_sha256(source.url, got.sha256)
        store.discard_work(STEP.name, url_hash(source.url))
    return ref
