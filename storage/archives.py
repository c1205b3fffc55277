"""Reading and extracting archives safely: tar (.tar, .tar.gz, .tgz) and zip.

Our archives only ever need regular files and directories, so every other member type
(symlink, hardlink, device, FIFO) is refused, as is any name that is absolute or contains
`..`. Each member is checked before anything is written, and a
gzip stream is always read to its end: tarfile stops silently at the first invalid header,
so only the gzip CRC at the end of the stream catches a corrupted middle.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from storage.errors import InputFormatError, UnsafeArchiveError

DEFAULT_MAX_EXTRACTED_BYTES = 2 * 1024**3
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_READ_ERRORS = (EOFError, gzip.BadGzipFile, tarfile.ReadError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Member:
    """One archive member: a directory (data is None) or a regular file with its bytes."""

    name: str  # normalised relative POSIX path, no leading "./", no trailing "/"
    is_dir: bool
    data: bytes | None = None


def safe_member_name(name: str, archive: str | os.PathLike) -> str:
    """The member's normalised relative path, or UnsafeArchiveError if it could escape the target."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    parts = [p for p in PurePosixPath(posix).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'")
    return "/".join(parts)


def _check_tar_member(info: tarfile.TarInfo, archive) -> str:
    name = safe_member_name(info.name, archive)
    if info.issym() or info.islnk():
        raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a link (to {info.linkname!r}); links are refused")
    if not (info.isfile() or info.isdir()):
        raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a device, FIFO or other special file; refused")
    return name


@contextmanager
def _open_tar_stream(path: Path) -> Iterator[tuple[tarfile.TarFile, IO[bytes]]]:
    """A sequential tar reader over the (decompressed) stream, plus that stream for draining."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if magic == _GZIP_MAGIC else raw
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar, stream
        finally:
            if stream is not raw:
                stream.close()


def iter_tar(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES) -> Iterator[Member]:
    """Yield every member of a tar archive with its bytes, validating each before it is yielded.

    Nothing touches the disk. Raises UnsafeArchiveError for a dangerous member, InputFormatError
    for a corrupt/truncated archive (after draining the gzip stream, so a CRC error is seen)
    or when the members add up to more than max_bytes.
    """
    path = Path(path)
    total = 0
    try:
        with _open_tar_stream(path) as (tar, stream):
            for info in tar:
                name = _check_tar_member(info, path)
                if not name:
                    continue
                if info.isdir():
                    yield Member(name, True)
                    continue
                total += info.size
                if total > max_bytes:
                    raise InputFormatError(f"{path}: members add up to more than the limit of {max_bytes:,} bytes "
                                           f"(max_extracted_bytes) at {info.name!r}")
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise InputFormatError(f"{path}: member {info.name!r} is truncated "
                                           f"({len(data):,} of {info.size:,} bytes)")
                yield Member(name, False, data)
            # tarfile ends at the first unreadable header; drain so the gzip CRC/length check runs.
            while stream.read(1 << 20):
                pass
    except _READ_ERRORS as exc:
        raise InputFormatError(f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc


# -- zip ----------------------------------------------------------------------------------------
def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return (mode & 0o170000) == 0o120000


def open_zip(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES) -> zipfile.ZipFile:
    """Open a zip after checking every member's name, type and declared size (zip bombs)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InputFormatError(f"{path}: not a readable zip archive ({type(exc).__name__}: {exc})") from exc
    try:
        total = 0
        for info in zf.infolist():
            safe_member_name(info.filename, path)
            if _zip_is_link(info):
                raise UnsafeArchiveError(f"{path}: member {info.filename!r} is a symlink; links are refused")
            total += info.file_size
            if total > max_bytes:
                raise InputFormatError(f"{path}: members declare more than the limit of {max_bytes:,} bytes "
                                       f"(max_extracted_bytes) at {info.filename!r}")
    except BaseException:
        zf.close()
        raise
    return zf


def open_zip_member(zf: zipfile.ZipFile, member: str) -> IO[bytes]:
    """A streaming reader of one member; InputFormatError listing the members if it is absent."""
    names = zf.namelist()
    if member not in names:
        raise InputFormatError(f"{zf.filename}: no member {member!r}; members are {names}")
    return zf.open(member)


def iter_zip(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES) -> Iterator[Member]:
    """Like iter_tar for a zip archive (CRC checked as each member is read)."""
    path = Path(path)
    with open_zip(path, max_bytes) as zf:
        for info in zf.infolist():
            name = safe_member_name(info.filename, path)
            if not name:
                continue
            if info.is_dir():
                yield Member(name, True)
                continue
            try:
                data = zf.read(info)
            except _READ_ERRORS as exc:
                raise InputFormatError(f"{path}: member {info.filename!r} is corrupt ({type(exc).__name__}: {exc})") from exc
            yield Member(name, False, data)


def iter_archive(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES) -> Iterator[Member]:
    """Members of a tar (plain or gzip) or zip archive, chosen by the file's magic bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC:
        return iter_zip(path, max_bytes)
    if magic[:2] != _GZIP_MAGIC and not tarfile.is_tarfile(path):
        raise InputFormatError(f"{path}: not a tar, tar.gz or zip archive (starts with {magic!r})")
    return iter_tar(path, max_bytes)
