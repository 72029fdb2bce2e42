"""Tar archives read for an update (core.tarread's TarReader): damage at
any point fails the pass, and members carry what the headers say."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import SourceError
from tests import samples
from tests.apply.readers.readkit import (
    compress,
    make_tar,
    read_all,
    read_spec,
    shape,
)


def test_plain_tar_cut_at_a_member_boundary(tmp_path: Path, staging: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("a", "b"):
            info = tarfile.TarInfo(name)
            info.size = 600
            tar.addfile(info, io.BytesIO(b"x" * 600))
        boundary = tar.offset
    path = tmp_path / "cut.tar"
    path.write_bytes(buf.getvalue()[:boundary])
    with open_update(str(path), staging=staging) as reader, \
            pytest.raises(SourceError, match="no end-of-archive marker"):
        read_all(reader)


def test_damaged_second_tar_header(tmp_path: Path, staging: Path) -> None:
    # Python's tarfile stops quietly at a bad header after the first.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a", "b", "c"):
            info = tarfile.TarInfo(name)
            info.size = 10
            tar.addfile(info, io.BytesIO(b"y" * 10))
    raw = bytearray(buf.getvalue())
    raw[1024 + 148] ^= 1  # b's header checksum
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(raw))
    with open_update(str(path), staging=staging) as reader, \
            pytest.raises(SourceError, match="unreadable tar header at offset 1024"):
        read_all(reader)


@pytest.mark.parametrize("how", ["none", "gzip"])  # read in place, and streamed
def test_data_after_the_tar_end_is_refused(tree: Path, tmp_path: Path, staging: Path,
                                           how: str) -> None:
    one = make_tar(tree, tmp_path / "one.tar")
    two = tmp_path / "two.tar"
    two.write_bytes(one.read_bytes() * 2)  # `cat a.tar b.tar`: GNU tar reads only a.tar
    with open_update(str(compress(two, how)), staging=staging) as reader, \
            pytest.raises(SourceError, match="data after the end-of-archive marker"):
        read_all(reader)
    three = tmp_path / "three.tar"
    three.write_bytes(one.read_bytes() + bytes(100_000) + b"x")  # far past the marker
    with open_update(str(compress(three, how)), staging=staging) as reader, \
            pytest.raises(SourceError, match="data after the end-of-archive marker"):
        read_all(reader)
    padded = tmp_path / "padded.tar"
    padded.write_bytes(one.read_bytes() + bytes(100_000))
    with open_update(str(compress(padded, how)), staging=staging) as reader:
        assert shape(read_all(reader)) == shape(read_spec(tree, staging))


# ------------------------------------------------------ what members carry


def test_names_are_reported_as_spelled(tmp_path: Path, staging: Path) -> None:
    names = [".", "./x", "../evil", "/etc/passwd", "a/../../b", "./../up"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
        link = tarfile.TarInfo("./hard")
        link.type, link.linkname = tarfile.LNKTYPE, "./x"
        tar.addfile(link)
    path = tmp_path / "evil.tar"
    path.write_bytes(buf.getvalue())
    got = read_spec(path, staging)
    assert [m.name for m, _ in got] == ["", "x", "../evil", "/etc/passwd", "a/../../b",
                                        "../up", "hard"]
    assert got[-1][0].kind is Kind.HARDLINK and got[-1][0].target == "x"


def test_tar_metadata(tmp_path: Path, staging: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("./usr/bin/ping")
        info.size, info.mode, info.uid, info.gid = 4, 0o4755, 7, 5
        info.pax_headers = {"mtime": "1600000000.123456789",
                            "SCHILY.xattr.security.capability": samples.CAPABILITY.decode(
                                "utf-8", "surrogateescape"),
                            "SCHILY.xattr.user.a": "b"}
        tar.addfile(info, io.BytesIO(b"ping"))
        dev = tarfile.TarInfo("dev/loop9")
        dev.type, dev.devmajor, dev.devminor, dev.mode, dev.gid = tarfile.BLKTYPE, 7, 9, 0o660, 6
        tar.addfile(dev)
        fifo = tarfile.TarInfo("run/initctl")
        fifo.type, fifo.mode, fifo.mtime = tarfile.FIFOTYPE, 0o600, -5
        tar.addfile(fifo)
    path = tmp_path / "meta.tar"
    path.write_bytes(buf.getvalue())
    got = dict(read_spec(path, staging))
    by_name = {m.name: m for m in got}
    ping = by_name["usr/bin/ping"]
    assert (ping.kind, ping.mode, ping.uid, ping.gid, ping.size) == (Kind.FILE, 0o4755, 7, 5, 4)
    assert ping.mtime_ns == 1_600_000_000_123_456_789
    assert ping.xattrs == (("security.capability", samples.CAPABILITY), ("user.a", b"b"))
    assert got[ping] == b"ping"
    loop = by_name["dev/loop9"]
    assert (loop.kind, loop.rdev, loop.mode, loop.gid) == (Kind.BLOCK, (7, 9), 0o660, 6)
    assert by_name["run/initctl"].kind is Kind.FIFO
    assert by_name["run/initctl"].mtime_ns == -5 * 10**9


def test_gnu_long_names_and_links(tmp_path: Path, staging: Path) -> None:
    long = "d/" + "n" * 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(long)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"z"))
        sym = tarfile.TarInfo("s")
        sym.type, sym.linkname = tarfile.SYMTYPE, "/" + "t" * 300
        tar.addfile(sym)
    path = tmp_path / "gnu.tar"
    path.write_bytes(buf.getvalue())
    got = read_spec(path, staging)
    assert [(m.name, m.target) for m, _ in got] == [(long, ""), ("s", "/" + "t" * 300)]


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_sparse_members_yield_their_full_data(tmp_path: Path, staging: Path,
                                              fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"tail")
    archive = make_tar(src, tmp_path / "s.tar", "--sparse", fmt=fmt)
    got = dict((m.name, (m, d)) for m, d in read_spec(archive, staging))
    member, data = got["sparse"]
    assert member.size == (8 << 20) + 4
    assert data == (src / "sparse").read_bytes()


def test_unsupported_tar_entry_type(tmp_path: Path, staging: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("label")
        info.type = b"V"  # a GNU volume header
        tar.addfile(info)
    path = tmp_path / "v.tar"
    path.write_bytes(buf.getvalue())
    with open_update(str(path), staging=staging) as reader, \
            pytest.raises(SourceError, match="unsupported tar entry type b'V'"):
        read_all(reader)
