"""Reading and extracting archives safely: tar (.tar, .tar.gz, .tgz) and zip.

Our archives only ever need regular files and directories, so every other member type
(symlink, hardlink, device, FIFO) is refused, as is any name that is absolute or contains
`..`. Each member is checked before anything is written, and a
gzip stream is always read to its end: tarfile stops silently at the first invalid header,
so only the gzip CRC at the end of the stream catches a corrupted middle.

Memory is bounded per member: with `max_member_bytes`, a member's first max_member_bytes
bytes are kept and the rest is skipped (streamed, never held), and `Member.full_size` says
what was cut. Member names are made safe to store and print (`escape_name`): a byte that is
not UTF-8, a control or other non-printable character, and `%` itself are percent-encoded.
Reading stops between members once a stop is requested (SIGTERM: storage.http.request_stop).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from storage.errors import InputFormatError, Interrupted, UnsafeArchiveError
from storage.http import stop_requested

DEFAULT_MAX_EXTRACTED_BYTES = 2 * 1024**3
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_READ_ERRORS = (EOFError, gzip.BadGzipFile, tarfile.ReadError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Member:
    """One archive member: a directory (data is None) or a regular file with its bytes."""

    name: str  # normalised relative POSIX path, no leading "./", no trailing "/", escaped (escape_name)
    is_dir: bool
    data: bytes | None = None
    full_size: int | None = None  # the member's size when `data` is only its first max_member_bytes


def escape_name(name: str) -> str:
    """`name` with `%`, non-printable characters (controls such as a newline or ESC, format and
    separator characters) and undecodable bytes (tarfile's surrogate escapes) percent-encoded as
    their UTF-8 / raw bytes. The rule is reversible: percent-decoding gives the original bytes."""
    if name.isprintable() and "%" not in name:
        return name
    out = []
    for ch in name:
        if "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        elif ch == "%" or not ch.isprintable():
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def _check_stop(archive) -> None:
    if stop_requested():
        raise Interrupted(f"reading {archive} stopped on request")


def _read_member(f: IO[bytes] | None, size: int, limit: int | None, name: str, archive) -> tuple[bytes, int | None]:
    """(the member's bytes, or its first `limit` bytes; its full size if cut). Checks the length read."""
    keep = size if limit is None else min(size, limit)
    data = f.read(keep) if f is not None else b""
    if len(data) != keep:
        raise InputFormatError(f"{archive}: member {name!r} is truncated ({len(data):,} of {size:,} bytes)")
    return data, (size if keep < size else None)


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


def iter_tar(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES,
             max_member_bytes: int | None = None) -> Iterator[Member]:
    """Yield every member of a tar archive with its bytes (at most max_member_bytes of each),
    validating each before it is yielded.

    Nothing touches the disk. Raises UnsafeArchiveError for a dangerous member, InputFormatError
    for a corrupt/truncated archive (after draining the gzip stream, so a CRC error is seen)
    or when the members add up to more than max_bytes.
    """
    path = Path(path)
    total = 0
    try:
        with _open_tar_stream(path) as (tar, stream):
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every TarInfo it read; a stream never looks back
                _check_stop(path)
                name = escape_name(_check_tar_member(info, path))
                if not name:
                    continue
                if info.isdir():
                    yield Member(name, True)
                    continue
                total += info.size
                if total > max_bytes:
                    raise InputFormatError(f"{path}: members add up to more than the limit of {max_bytes:,} bytes "
                                           f"(max_extracted_bytes) at {info.name!r}")
                # the rest of a cut member is skipped by the next header read, block by block
                data, full_size = _read_member(tar.extractfile(info), info.size, max_member_bytes, info.name, path)
                yield Member(name, False, data, full_size)
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
    """A streaming reader of one member (it raises Interrupted once a stop is requested); InputFormatError
    listing the members if it is absent."""
    names = zf.namelist()
    if member not in names:
        raise InputFormatError(f"{zf.filename}: no member {member!r}; members are {names}")
    return io.BufferedReader(_Stoppable(zf.open(member), f"{zf.filename}:{member}"), 1 << 20)


class _Stoppable(io.RawIOBase):
    """A member's stream that checks for a stop request before each read (a parser may read for minutes)."""

    def __init__(self, raw: IO[bytes], name: str):
        self.raw, self.name = raw, name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        _check_stop(self.name)
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


def iter_zip(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES,
             max_member_bytes: int | None = None) -> Iterator[Member]:
    """Like iter_tar for a zip archive (CRC checked as each member is read to its end)."""
    path = Path(path)
    with open_zip(path, max_bytes) as zf:
        for info in zf.infolist():
            _check_stop(path)
            name = escape_name(safe_member_name(info.filename, path))
            if not name:
                continue
            if info.is_dir():
                yield Member(name, True)
                continue
            try:
                with zf.open(info) as f:
                    data, full_size = _read_member(f, info.file_size, max_member_bytes, info.filename, path)
                    while f.read(1 << 20):  # the rest of a cut member: read (for its CRC), not kept
                        pass
            except _READ_ERRORS as exc:
                raise InputFormatError(f"{path}: member {info.filename!r} is corrupt ({type(exc).__name__}: {exc})") from exc
            yield Member(name, False, data, full_size)


def iter_archive(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES,
                 max_member_bytes: int | None = None) -> Iterator[Member]:
    """Members of a tar (plain or gzip) or zip archive, chosen by the file's magic bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC:
        return iter_zip(path, max_bytes, max_member_bytes)
    if magic[:2] != _GZIP_MAGIC and not tarfile.is_tarfile(path):
        raise InputFormatError(f"{path}: not a tar, tar.gz or zip archive (starts with {magic!r})")
    return iter_tar(path, max_bytes, max_member_bytes)
