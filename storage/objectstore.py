"""A data home on an object store (s3://bucket/prefix, gs://bucket/prefix) through pyarrow.fs.

Layout under the prefix:

    <step>/<key>/manifest.json                  the artifact: it exists only once complete
    <step>/<key>/<attempt>/<file>               the files it lists (manifest "files"[name]["object"])
    <step>/.quarantine/<key>-<time>/...         a damaged artifact, moved aside

Publishing is safe across hosts: every attempt uploads its files under its own <attempt> prefix,
then creates manifest.json with a create-only write (S3 PutObject If-None-Match: *, through
boto3: pyarrow cannot send it). The first writer wins; a loser deletes its attempt and adopts
the winner's artifact. A manifest names only its own attempt's objects, so a reader never mixes
the files of two attempts. On gs:// (no create-only write here) the manifest is written and read
back: the last writer wins, and an attempt that sees another manifest deletes its own files.

Bytes go up and down exactly as written (compression=None: pyarrow's default, "detect", would
gzip a .tar.gz once more on upload and gunzip it on download). Readers get local files from the
host's one object cache (storage.cache), hashed while downloaded; finding an artifact reads its
manifest and the objects' sizes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from storage.cache import ObjectCache
from storage.errors import StoreUnavailable, UsageError
from storage.home import MANIFEST
from storage.integrity import Damaged, mismatch

CHUNK = 8 << 20
SETTINGS = ("AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and "
            "NEWSGROUPS_LSTM_HOME")


def endpoint_url() -> str | None:
    """The S3 endpoint, as boto3 reads it (AWS_ENDPOINT_URL_S3 first, then AWS_ENDPOINT_URL)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, bucket/prefix path) of an object-store URI; S3 honours AWS_ENDPOINT_URL."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "s3":
        options = {}
        if endpoint := endpoint_url():
            parsed = urlparse(endpoint)
            options = {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
        return pafs.S3FileSystem(region=_region(), **options), uri[len("s3://"):].strip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"data home {uri}: unsupported (use a local path, s3://bucket/prefix or gs://bucket/prefix): "
                         f"{exc}") from None


class ObjectHome:
    """The storage side of ArtifactStore for an object-store data home (see the module docstring)."""

    remote = True

    def __init__(self, uri: str):
        self.root = uri
        self.scheme = uri.split("://", 1)[0].lower()
        self.fs, self.base = filesystem(uri)
        self.bucket = self.base.split("/", 1)[0]
        self.cache = ObjectCache()
        # Local scratch of this host for this data home: build staging (beside the cache: adopting a built
        # file is a rename), resumable work, locks (locks are per host; the create-only manifest is not).
        self.scratch = self.cache.root / "homes" / hashlib.sha256(uri.encode()).hexdigest()[:12]

    # -- small files and listing ------------------------------------------------------------------
    def _abs(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def read(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._abs(rel), compression=None) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        """One PUT: a reader sees the old object or the new one, never a part."""
        with self.fs.open_output_stream(self._abs(rel), compression=None) as f:
            f.write(data)

    def delete(self, rel: str) -> bool:
        """Delete one object; True if it was there."""
        try:
            self.fs.delete_file(self._abs(rel))
        except FileNotFoundError:
            return False
        return True

    def delete_tree(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self._abs(rel))
        except FileNotFoundError:
            pass

    def children(self, rel: str) -> list[str]:
        """Names of the "directories" (common prefixes) right under rel."""
        selector = pafs.FileSelector(self._abs(rel), recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def file_uri(self, step: str, key: str, name: str, meta: dict) -> str:
        return f"{self.root}/{step}/{key}/{meta.get('object', name)}"

    # -- checking and reading artifacts ------------------------------------------------------------
    def verify(self, step: str, key: str, manifest: dict, full: bool = False) -> None:
        """Raise Damaged unless every listed object exists with its size (full=True: and its sha256, by
        streaming it; the cache is neither used nor filled)."""
        files = manifest.get("files", {})
        paths = [self._abs(f"{step}/{key}/{meta.get('object', name)}") for name, meta in files.items()]
        for (name, meta), info in zip(files.items(), self.fs.get_file_info(paths), strict=True):
            uri = self.file_uri(step, key, name, meta)
            if info.type != pafs.FileType.File or info.size != meta["bytes"]:
                raise Damaged(mismatch(uri, info.size if info.type == pafs.FileType.File else None, None, meta))
            if full:
                got = self._copy(info.path, None)
                if got != meta["sha256"]:
                    raise Damaged(mismatch(uri, meta["bytes"], got, meta))

    def path(self, step: str, key: str, name: str, meta: dict) -> Path:
        """A verified local copy of one file, from the object cache (downloaded and hashed on a miss)."""
        source = self._abs(f"{step}/{key}/{meta.get('object', name)}")
        try:
            return self.cache.get(name, meta, lambda dest: self._copy(source, dest))
        except FileNotFoundError:
            raise Damaged(mismatch(self.file_uri(step, key, name, meta), None, None, meta)) from None
        except Damaged as exc:
            raise Damaged(f"{self.file_uri(step, key, name, meta)} (downloaded): {exc}") from None

    def directory(self, step: str, key: str, paths: dict[str, Path]) -> Path:
        """A local directory holding the artifact's files by name (symlinks into the cache), for readers
        that want a directory (predict)."""
        view = self.scratch / "views" / step / key
        view.mkdir(parents=True, exist_ok=True)
        for name, target in paths.items():
            link = view / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
        return view

    def _copy(self, source: str, dest: Path | None) -> str:
        """Stream an object to dest (or nowhere), returning its sha256."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(source, compression=None) as src, \
                (open(dest, "wb") if dest is not None else contextlib.nullcontext()) as out:
            while block := src.read(CHUNK):
                digest.update(block)
                if out is not None:
                    out.write(block)
        return digest.hexdigest()

    # -- publishing ---------------------------------------------------------------------------------
    def commit(self, step: str, key: str, staging: Path, manifest: dict) -> bool:
        """Upload the staged files under a fresh attempt prefix, then create the manifest naming them.

        True if this attempt's manifest is the artifact; False if another attempt's is (ours is deleted).
        """
        attempt = f"attempt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(4).hex()}"
        manifest["attempt"] = attempt
        for name, meta in manifest["files"].items():
            meta["object"] = f"{attempt}/{name}"
            with open(staging / name, "rb") as src, \
                    self.fs.open_output_stream(self._abs(f"{step}/{key}/{meta['object']}"), compression=None) as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        won = self._create(f"{step}/{key}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode(), attempt)
        if not won:
            self.delete_tree(f"{step}/{key}/{attempt}")
            return False
        if self.scheme == "s3":  # with create-only manifests no other attempt can still win: drop their leftovers
            for child in self.children(f"{step}/{key}"):
                if child != attempt:
                    self.delete_tree(f"{step}/{key}/{child}")
        for name, meta in manifest["files"].items():
            self.cache.adopt(staging / name, name, meta["sha256"])
        return True

    def _create(self, rel: str, data: bytes, attempt: str) -> bool:
        """Create `rel` only if it does not exist: True if this call created it."""
        if self.scheme != "s3":  # no create-only write through pyarrow: write, then see whose manifest is there
            self.write(rel, data)
            return json.loads(self.read(rel) or b"{}").get("attempt") == attempt
        from botocore.exceptions import ClientError

        object_key = self._abs(rel).split("/", 1)[1]
        for _ in range(5):
            try:
                self._client.put_object(Bucket=self.bucket, Key=object_key, Body=data, IfNoneMatch="*",
                                        ContentType="application/json")
                return True
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:  # PreconditionFailed: another attempt's manifest is there
                    return False
                if status != 409:  # 409 ConditionalRequestConflict: a concurrent create; ask again
                    raise
                time.sleep(0.2)
        return False

    def quarantine(self, step: str, key: str) -> str:
        """Move everything under <step>/<key>/ to <step>/.quarantine/<key>-<time>/ (copy, then delete the
        manifest first, so the artifact stops counting before its files go)."""
        source = self._abs(f"{step}/{key}")
        target = self._abs(f"{step}/.quarantine/{key}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        infos = [i for i in self.fs.get_file_info(pafs.FileSelector(source, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File]
        for info in infos:
            self.fs.copy_file(info.path, target + info.path[len(source):])
        self.delete(f"{step}/{key}/{MANIFEST}")
        self.delete_tree(f"{step}/{key}")
        return f"{self.scheme}://{target}"

    # -- preflight ------------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail within seconds, with one line, if the bucket cannot be reached or used."""
        if self.scheme != "s3":
            try:
                info = self.fs.get_file_info(self.bucket)
            except OSError as exc:
                raise StoreUnavailable(f"data home {self.root}: {_first_line(exc)}; check NEWSGROUPS_LSTM_HOME "
                                       f"and the GCS credentials") from None
            if info.type == pafs.FileType.NotFound:
                raise StoreUnavailable(f"data home {self.root}: bucket {self.bucket} not found; check NEWSGROUPS_LSTM_HOME")
            return
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        endpoint = endpoint_url() or "the AWS default endpoint"
        where = f"data home {self.root} at {endpoint}"
        client = boto3.client("s3", endpoint_url=endpoint_url(), region_name=_region(),
                              config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}))
        try:
            client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StoreUnavailable(f"{where}: no credentials (set {SETTINGS})") from None
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            reason = {404: f"bucket {self.bucket} does not exist", 403: "access denied (wrong credentials?)",
                      400: "bad request (wrong region or credentials?)"}.get(status, _first_line(exc))
            raise StoreUnavailable(f"{where}: {reason}; it is configured by {SETTINGS}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{where}: unreachable ({_first_line(exc)}); it is configured by {SETTINGS}") from None

    @cached_property
    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint_url(), region_name=_region(),
                            config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"}))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
