"""storage.archives: unsafe members are refused before anything is written; corrupt archives fail loudly."""

from __future__ import annotations

import io
import tarfile
import zipfile
from urllib.parse import unquote_to_bytes

import pytest

from storage.archives import iter_archive, iter_tar, open_zip, open_zip_member
from storage.errors import InputFormatError, Interrupted, UnsafeArchiveError


def make_tar(path, members, mode="w:gz"):
    """members: (name, bytes) for files, or a ready TarInfo (links, devices, dirs)."""
    with tarfile.open(path, mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_members_are_read_without_touching_disk(tmp_path):
    arc = make_tar(tmp_path / "a.tar.gz", [special("top", tarfile.DIRTYPE), ("top/g/1", b"one"), ("./top/g/2", b"two")])
    members = list(iter_tar(arc))
    assert [(m.name, m.is_dir, m.data) for m in members] == [("top", True, None), ("top/g/1", False, b"one"), ("top/g/2", False, b"two")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz"]


@pytest.mark.parametrize(
    "bad",
    [
        ("../x", b"escape"),
        ("/etc/x", b"absolute"),
        special("link", tarfile.SYMTYPE, "/etc/passwd"),
        special("hard", tarfile.LNKTYPE, "top/ok.txt"),
        special("dev", tarfile.CHRTYPE),
        special("fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device", "fifo"],
)
def test_unsafe_member_refuses_the_whole_archive(tmp_path, bad):
    arc = make_tar(tmp_path / "a.tar.gz", [("top/ok.txt", b"fine"), bad])
    name = bad[0] if isinstance(bad, tuple) else bad.name
    with pytest.raises(UnsafeArchiveError, match=name.lstrip("/").replace(".", r"\.")):
        list(iter_tar(arc))
    with pytest.raises(UnsafeArchiveError):
        list(iter_archive(arc))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tar.gz"]  # nothing written, not even top/ok.txt


def test_size_cap(tmp_path):
    arc = make_tar(tmp_path / "a.tar.gz", [("a", b"x" * 600), ("b", b"x" * 600)])
    with pytest.raises(InputFormatError, match="max_extracted_bytes"):
        list(iter_tar(arc, max_bytes=1000))


def test_corrupt_gzip_in_the_middle_raises(tmp_path):
    # Incompressible members, so a flipped byte lands in compressed file data, not in a header.
    import os

    members = [(f"top/g/{i}", os.urandom(20_000)) for i in range(20)]
    arc = make_tar(tmp_path / "a.tar.gz", members)
    raw = bytearray(arc.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    arc.write_bytes(bytes(raw))
    with pytest.raises(InputFormatError, match="a.tar.gz"):
        list(iter_tar(arc))


def test_truncated_tar_gz_raises(tmp_path):
    arc = make_tar(tmp_path / "a.tar.gz", [(f"top/g/{i}", b"hello world " * 500) for i in range(50)])
    arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    with pytest.raises(InputFormatError, match="corrupt or truncated"):
        list(iter_tar(arc))


def test_not_an_archive(tmp_path):
    html = tmp_path / "page.tar.gz"
    html.write_bytes(b"<html><body>Moved</body></html>" * 20)
    with pytest.raises(InputFormatError, match="not a tar"):
        list(iter_archive(html))


def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def test_zip_members_and_missing_member(tmp_path):
    arc = make_zip(tmp_path / "v.zip", [("glove.6B.50d.txt", b"the 1 2\n")])
    with open_zip(arc) as zf:
        assert open_zip_member(zf, "glove.6B.50d.txt").read() == b"the 1 2\n"
        with pytest.raises(InputFormatError, match=r"no member 'glove.6B.100d.txt'.*glove.6B.50d.txt"):
            open_zip_member(zf, "glove.6B.100d.txt")
    assert [m.name for m in iter_archive(arc)] == ["glove.6B.50d.txt"]


def test_truncated_zip(tmp_path):
    arc = make_zip(tmp_path / "v.zip", [("a.txt", b"x" * 10_000)])
    arc.write_bytes(arc.read_bytes()[:-30])  # the central directory is at the end
    with pytest.raises(InputFormatError, match="v.zip"):
        open_zip(arc)


def test_zip_unsafe_names_and_declared_size_cap(tmp_path):
    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil"):
        open_zip(make_zip(tmp_path / "a.zip", [("../evil", b"x")]))
    with pytest.raises(InputFormatError, match="max_extracted_bytes"):
        open_zip(make_zip(tmp_path / "b.zip", [("a", b"0" * 5000)]), max_bytes=1000)


def test_zip_member_crc_error(tmp_path):
    arc = make_zip(tmp_path / "c.zip", [("a.txt", b"hello " * 1000)])
    raw = bytearray(arc.read_bytes())
    pos = raw.index(b"a.txt") + len("a.txt") + 5  # inside the compressed data of the first member
    raw[pos] ^= 0xFF
    arc.write_bytes(bytes(raw))
    with pytest.raises(InputFormatError, match="a.txt"):
        list(iter_archive(arc))


# -- names and sizes a hostile archive can carry ---------------------------------------------------
def test_member_names_with_bad_bytes_and_control_characters_are_percent_escaped(tmp_path):
    arc = tmp_path / "n.tar"
    with tarfile.open(arc, "w", format=tarfile.GNU_FORMAT) as tar:  # GNU: names stored as raw bytes
        for raw in (b"top/g/caf\xe9", b"top/g/two\nlines", b"top/g/\x1b[31mred", b"top/g/100%", b"top/g/ok"):
            info = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    names = [m.name for m in iter_archive(arc)]
    assert names == ["top/g/caf%E9", "top/g/two%0Alines", "top/g/%1B[31mred", "top/g/100%25", "top/g/ok"]
    assert all(n.isprintable() and n.encode("utf-8") for n in names)  # storable as UTF-8, safe to print
    assert [unquote_to_bytes(n) for n in names][:2] == [b"top/g/caf\xe9", b"top/g/two\nlines"]  # reversible


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_member_bytes_are_bounded_and_the_full_size_reported(tmp_path, kind):
    files = [("top/big", b"0123456789" * 1000), ("top/small", b"tiny"), ("top/exact", b"x" * 100)]
    arc = make_tar(tmp_path / "a.tar.gz", files) if kind == "tar.gz" else make_zip(tmp_path / "a.zip", files)
    got = {m.name: (m.data, m.full_size) for m in iter_archive(arc, max_member_bytes=100)}
    assert got == {"top/big": (b"0123456789" * 10, 10_000), "top/small": (b"tiny", None), "top/exact": (b"x" * 100, None)}


def test_reading_stops_between_members_when_a_stop_is_requested(tmp_path):
    from storage.http import clear_stop, request_stop

    arc = make_tar(tmp_path / "a.tar.gz", [("top/a", b"a"), ("top/b", b"b")])
    members = iter_archive(arc)
    zipped = make_zip(tmp_path / "v.zip", [("vectors.txt", b"the 1 2\n" * 500_000)])  # a parser reads it in chunks
    with open_zip(zipped) as zf, open_zip_member(zf, "vectors.txt") as stream:
        assert next(members).name == "top/a" and stream.read(10) == b"the 1 2\nth"
        request_stop()
        try:
            with pytest.raises(Interrupted, match="a.tar.gz"):
                next(members)
            with pytest.raises(Interrupted, match="v.zip:vectors.txt"):
                stream.read()
        finally:
            clear_stop()
