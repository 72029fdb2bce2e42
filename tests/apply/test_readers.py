"""Update readers: every kind of input gives the same members, and every
damaged input fails during the pass, never yielding less without a word."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from dmoverlay.apply import readers as updates
from dmoverlay.apply.readers import Format, identify, open_update
from dmoverlay.core import log
from dmoverlay.core.entries import InFile, Kind, Member, UpdateReader, file_identity
from dmoverlay.core.errors import SourceError, UsageError
from tests import samples

COMPRESSORS: dict[str, list[str]] = {
    "none": [],
    "gzip": ["gzip", "-9", "-c"],
    "xz": ["xz", "-c"],
    "bzip2": ["bzip2", "-c"],
    "zstd": ["zstd", "-q", "-c"],
}

Read = list[tuple[Member, bytes | None]]


def read_all(reader: UpdateReader) -> Read:
    return [(m, None if d is None else d.read()) for m, d in reader.members()]


def read_spec(spec: str | Path, staging: Path, *, sha256: str | None = None) -> Read:
    with open_update(str(spec), staging=staging, sha256=sha256) as reader:
        return read_all(reader)


Shape = tuple[frozenset[tuple[object, ...]], frozenset[frozenset[str]]]


def shape(got: Read, *, owners: bool = True) -> Shape:
    """What must agree whatever the update came in: hardlink groups are
    compared as groups, since formats differ in which name carries the data."""
    files = {m.name: m for m, _ in got}
    data = {m.name: d for m, d in got if m.kind is Kind.FILE}
    groups: dict[str, set[str]] = {}
    for m, _ in got:
        if m.kind is Kind.HARDLINK:
            groups.setdefault(m.target, {m.target}).add(m.name)
    rows = set()
    for m, _ in got:
        inode = files[m.target] if m.kind is Kind.HARDLINK else m
        content = data.get(inode.name) if inode.kind is Kind.FILE else None
        row: tuple[object, ...] = (m.name, inode.kind, m.mode, inode.size, inode.rdev,
                                   m.target if m.kind is Kind.SYMLINK else "")
        if owners:
            row += (m.uid, m.gid)
        rows.add((*row, hashlib.sha256(content).hexdigest() if content is not None else ""))
    return frozenset(rows), frozenset(frozenset(g) for g in groups.values())


def compress(path: Path, how: str) -> Path:
    if how == "none":
        return path
    out = path.with_name(f"{path.name}.{how}")
    with open(path, "rb") as src, open(out, "wb") as dst:
        subprocess.run(COMPRESSORS[how], stdin=src, stdout=dst, check=True)
    return out


def walk_order(root: Path) -> list[str]:
    """The directory reader's order, as `find` would print it for cpio."""
    reader = updates.DirectoryReader(root, description="")
    return ["." if not m.name else f"./{m.name}" for m, _ in reader.members()]


def make_cpio(root: Path, out: Path, *args: str) -> Path:
    names = "\n".join(walk_order(root)).encode() + b"\n"
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "--quiet", *(args or ("-H", "newc"))], cwd=root,
                       input=names, stdout=f, check=True)
    return out


def make_tar(root: Path, out: Path, *args: str, fmt: str = "posix") -> Path:
    xattrs = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    subprocess.run(["tar", "--create", f"--format={fmt}", "--sort=name", "--numeric-owner",
                    *xattrs, *args, "-f", str(out), "-C", str(root), "."], check=True)
    return out


def small_tree(root: Path) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(os.urandom(300_000))  # incompressible: spans blocks
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    (root / "etc").mkdir()
    (root / "etc/conf").write_bytes(b"key=value\n" * 1000)
    (root / "etc/empty").write_bytes(b"")
    os.chmod(root / "etc/conf", 0o600)
    os.setxattr(root / "etc/conf", "user.note", b"\x00binary\xff")
    os.utime(root / "etc/conf", ns=(0, 1_600_000_000_123_456_789))
    os.symlink("usr/bin", root / "bin")
    os.symlink("/does/not/exist", root / "dangling")
    (root / "var/log").mkdir(parents=True)
    return root


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "run-staging"
    path.mkdir()
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return small_tree(tmp_path / "tree")


# ------------------------------------------------------------------ detection


def test_identify_by_content() -> None:
    ustar = bytearray(512)
    ustar[257:263] = b"ustar\0"
    ext = bytearray(4096)
    ext[1080:1082] = b"\x53\xef"
    assert identify(b"070701" + bytes(104)) is Format.CPIO
    assert identify(b"070702" + bytes(104)) is Format.CPIO
    assert identify(b"070707" + bytes(70)) is Format.CPIO
    assert identify(b"\xc7\x71" + bytes(24)) is Format.CPIO
    assert identify(b"\x71\xc7" + bytes(24)) is Format.CPIO
    assert identify(bytes(ustar)) is Format.TAR
    assert identify(b"hsqs" + bytes(92)) is Format.SQUASHFS
    assert identify(bytes(ext)) is Format.EXT
    assert identify(b"hello world" * 100) is None
    assert identify(bytes(4096)) is None


def test_old_v7_tar_is_recognised_by_its_header_checksum() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    raw = bytearray(buf.getvalue()[:512])
    raw[257:265] = bytes(8)
    raw[148:156] = b"%06o\0 " % (sum(raw[:148]) + 8 * 32 + sum(raw[156:512]))
    assert identify(bytes(raw)) is Format.TAR
    raw[0] ^= 1
    assert identify(bytes(raw)) is None


def not_an_update(path: Path, staging: Path, words: str) -> None:
    with pytest.raises(SourceError, match=words) as info, \
            open_update(str(path), staging=staging):
        pass
    assert info.value.hint == updates.ACCEPTED


def test_unrecognised_content(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "update.img"  # the name says nothing
    path.write_bytes(os.urandom(5000))
    not_an_update(path, staging, r"not an update: .* \(content not recognised\)")
    path.write_bytes(b"")
    not_an_update(path, staging, r"\(empty file\)")
    path.write_bytes(compress_bytes(os.urandom(5000), "gzip"))
    not_an_update(path, staging, r"\(gzip-compressed, content not recognised\)")
    disk = bytearray(4096)
    disk[512:520] = b"EFI PART"
    path.write_bytes(bytes(disk))
    not_an_update(path, staging, "a gpt disk image")


def test_a_fifo_is_refused_without_hanging(tmp_path: Path, staging: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    not_an_update(tmp_path / "pipe", staging, "not a regular file or directory")


def test_missing_path(tmp_path: Path, staging: Path) -> None:
    with pytest.raises(SourceError, match=r"cannot read .*nope: No such file"), \
            open_update(str(tmp_path / "nope"), staging=staging):
        pass


def compress_bytes(data: bytes, how: str) -> bytes:
    return subprocess.run(COMPRESSORS[how], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_compressed_images_are_refused_with_a_hint(tmp_path: Path, staging: Path,
                                                   how: str) -> None:
    path = tmp_path / "image"
    path.write_bytes(compress_bytes(b"hsqs" + bytes(8000), how))
    with pytest.raises(SourceError, match=f"a {how}-compressed squashfs image") as info, \
            open_update(str(path), staging=staging):
        pass
    assert info.value.hint is not None and "decompress it first" in info.value.hint


def test_corrupt_compressed_head(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "u"
    path.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))
    with pytest.raises(SourceError, match="corrupt gzip data"), \
            open_update(str(path), staging=staging):
        pass


# ------------------------------------------- every format, every compression


@pytest.mark.parametrize("how", list(COMPRESSORS))
@pytest.mark.parametrize("fmt", ["tar", "cpio"])
def test_archive_gives_the_directory_members(tree: Path, tmp_path: Path, staging: Path,
                                             fmt: str, how: str) -> None:
    plain = tmp_path / f"update.{fmt}"
    (make_tar if fmt == "tar" else make_cpio)(tree, plain)
    archive = compress(plain, how)
    got = read_spec(archive, staging)
    expected = read_spec(tree, staging)
    assert shape(got) == shape(expected)
    times = {m.name: m.mtime_ns for m, _ in got}
    second = 1 if fmt == "tar" else 10**9  # cpio keeps whole seconds
    assert times == {m.name: m.mtime_ns // second * second for m, _ in expected}
    xattrs = {m.name: m.xattrs for m, _ in got if m.xattrs}
    assert xattrs == ({"etc/conf": (("user.note", b"\x00binary\xff"),)} if fmt == "tar" else {})
    with open_update(str(archive), staging=staging) as reader:
        kind = "" if how == "none" else f"{how}-compressed "
        assert reader.description == f"{kind}{fmt} archive {archive}"
        first = read_all(reader)
        for _ in reader.members():  # a pass that skips all the data
            pass
        assert read_all(reader) == first
    assert list(staging.iterdir()) == []


def damaged(archive: Path, how: str, fmt: str) -> Iterator[tuple[str, bytes]]:
    raw = archive.read_bytes()
    yield "cut in the middle", raw[: len(raw) * 2 // 3]
    if how != "none":  # (a plain archive ends in padding that may be cut)
        yield "cut near the end", raw[:-9]
        middle = bytearray(raw)
        middle[len(raw) // 2] ^= 0x55
        yield "a byte changed", bytes(middle)
    if how == "gzip":
        crc = bytearray(raw)
        crc[-8] ^= 1
        yield "bad CRC", bytes(crc)
        yield "no size and CRC", raw[:-8]
    if how == "xz":
        yield "no footer", raw[:-12]
    if how == "none" and fmt == "cpio":
        yield "no trailer", raw[: raw.index(b"TRAILER!!!") - 110]


@pytest.mark.parametrize("how", list(COMPRESSORS))
@pytest.mark.parametrize("fmt", ["tar", "cpio"])
def test_damaged_archives_fail(tree: Path, tmp_path: Path, staging: Path, fmt: str,
                               how: str) -> None:
    plain = tmp_path / f"update.{fmt}"
    (make_tar if fmt == "tar" else make_cpio)(tree, plain, *(["-H", "crc"] if fmt == "cpio"
                                                            else []))
    archive = compress(plain, how)
    bad = tmp_path / "bad"
    for what, data in damaged(archive, how, fmt):
        bad.write_bytes(data)
        with pytest.raises(SourceError) as info:  # opening or the pass may fail
            with open_update(str(bad), staging=staging) as reader:
                read_all(reader)
            pytest.fail(f"{what}: read without an error")
        assert "\n" not in info.value.message, what
    assert list(staging.iterdir()) == []


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


def _located(data: object) -> InFile | None:
    located = getattr(data, "located", None)
    return None if located is None else located()


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_lasting_plain_updates_locate_their_data(tree: Path, tmp_path: Path, staging: Path,
                                                 fmt: str) -> None:
    """A directory and a plain tar on disk say where each file's data lies, and
    a pass that takes the locations reads none of it; compressed archives and
    an image's directory (unmounted when the reader closes) do not."""
    (tree / "usr/share/doc").mkdir(parents=True)
    (tree / f"usr/share/doc/{'long-name-' * 20}").write_bytes(b"in a pax or GNU long name")
    archive = make_tar(tree, tmp_path / "u.tar", fmt=fmt)
    for spec, lasting in ((tree, True), (archive, True), (compress(archive, "xz"), False)):
        seen = 0
        with open_update(str(spec), staging=staging) as reader:
            for member, data in reader.members():
                place = _located(data)
                assert (place is not None) == (lasting and member.kind is Kind.FILE), spec
                if place is None:
                    continue
                with open(place.path, "rb") as f:
                    f.seek(place.offset)
                    assert f.read(place.size) == (tree / member.name).read_bytes()
                assert place.size == member.size
                assert place.identity == file_identity(os.stat(place.path))
                seen += 1
        assert seen == (4 if lasting else 0)
    image_dir = updates.DirectoryReader(tree, description="an image's directory")
    assert all(_located(d) is None for _, d in image_dir.members())


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


def test_directory_members(tmp_path: Path, staging: Path) -> None:
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    os.setxattr(root / "etc/os-release", "user.comment", b"hello")
    got = read_spec(root, staging)
    names = [m.name for m, _ in got]
    assert names[0] == ""
    for i, name in enumerate(names[1:], 1):  # parents first, then sorted siblings
        parent = name.rpartition("/")[0]
        assert parent in names[:i]
    by_name = {m.name: (m, d) for m, d in got}
    release, data = by_name["etc/os-release"]
    assert release.mtime_ns == 1_600_000_000_123_456_789
    assert ("user.comment", b"hello") in release.xattrs
    assert data == b"NAME=Sample\nID=sample\n"
    assert by_name["etc/empty"][0].mtime_ns == 4_102_444_800 * samples.NS
    assert by_name["lib"][0].kind is Kind.SYMLINK and by_name["lib"][0].target == "usr/lib"
    again = by_name["usr/bin/tool-again"][0]
    assert (again.kind, again.target) == (Kind.HARDLINK, "usr/bin/tool")
    assert names.index("usr/bin/tool") < names.index("usr/bin/tool-again")
    assert by_name["var/sparse.img"][0].size == 16 << 20
    assert read_spec(root, staging) == got
    (root / "etc/empty").write_bytes(b"now something")
    assert read_spec(root, staging) != got


def test_directory_named_through_a_symlink(tree: Path, tmp_path: Path,
                                          staging: Path) -> None:
    os.symlink(tree, tmp_path / "link")
    got = read_spec(tmp_path / "link", staging)
    assert got[0][0].kind is Kind.DIR
    assert got == read_spec(tree, staging)


def test_directory_file_changing_while_read(tree: Path, staging: Path) -> None:
    reader = updates.DirectoryReader(tree, description="tree")
    with pytest.raises(SourceError, match="etc/conf changed while it was read"):
        for member, _data in reader.members():
            if member.name == "etc/conf":
                (tree / "etc/conf").write_bytes(b"short")
    with pytest.raises(SourceError, match="etc/conf changed while it was read"):
        for member, _data in reader.members():
            if member.name == "etc/conf":
                with open(tree / "etc/conf", "ab") as f:
                    f.write(b"x" * 100)


@pytest.mark.parametrize("fmt", ["tar", "cpio", "directory"])
def test_hardlinks_come_after_their_file(tree: Path, tmp_path: Path, staging: Path,
                                         fmt: str) -> None:
    spec = {"directory": lambda: tree,
            "tar": lambda: make_tar(tree, tmp_path / "u.tar"),
            "cpio": lambda: make_cpio(tree, tmp_path / "u.cpio")}[fmt]()
    got = read_spec(spec, staging)
    seen: dict[str, Kind] = {}
    links = 0
    for member, data in got:
        if member.kind is Kind.HARDLINK:
            assert seen.get(member.target) is Kind.FILE
            assert data is None and member.size == 0
            links += 1
        seen[member.name] = member.kind
    assert links == 1


def test_stopping_a_pass_early_then_reading_again(tree: Path, tmp_path: Path,
                                                  staging: Path) -> None:
    archive = compress(make_tar(tree, tmp_path / "u.tar"), "zstd")
    with open_update(str(archive), staging=staging) as reader:
        for _ in reader.members():
            break
        assert len(read_all(reader)) == len(read_spec(tree, staging))


# ------------------------------------------------ the same update, any format


def _formats(root: Path, tmp_path: Path) -> dict[str, Path]:
    return {
        "tar": make_tar(root, tmp_path / "u.tar"),
        "tar.xz": compress(make_tar(root, tmp_path / "v.tar"), "xz"),
        "cpio newc": make_cpio(root, tmp_path / "u.cpio"),
        "cpio crc.zst": compress(make_cpio(root, tmp_path / "v.cpio", "-H", "crc"), "zstd"),
        "cpio odc": make_cpio(root, tmp_path / "w.cpio", "-H", "odc"),
    }


def test_same_members_from_directory_tar_and_cpio(tmp_path: Path, staging: Path) -> None:
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    expected = shape(read_spec(root, staging))
    for name, path in _formats(root, tmp_path).items():
        assert shape(read_spec(path, staging)) == expected, name


@pytest.mark.root
def test_same_members_from_a_rich_tree(rich_tree: Path, tmp_path: Path,
                                       staging: Path) -> None:
    expected = shape(read_spec(rich_tree, staging))
    for name, path in _formats(rich_tree, tmp_path).items():
        assert shape(read_spec(path, staging)) == expected, name


def test_anaconda_updates_img(tree: Path, tmp_path: Path, staging: Path) -> None:
    """`find . | cpio -c -o | gzip -9`, as anaconda's makeupdates does."""
    out = tmp_path / "updates.img"
    subprocess.run(f"find . | cpio -c -o --quiet | gzip -9 > {out}", shell=True, cwd=tree,
                   check=True)
    with open_update(str(out), staging=staging) as reader:
        assert reader.description == f"gzip-compressed cpio archive {out}"
        assert shape(read_all(reader)) == shape(read_spec(tree, staging))


# --------------------------------------------------------------------- images


def make_squashfs(root: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def make_ext4(root: Path, out: Path) -> Path:
    with open(out, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(out)], check=True)
    return out


def mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f" {path}" in line]


@pytest.mark.root
@pytest.mark.parametrize("fmt", ["squashfs", "ext"])
def test_images_give_the_directory_members(tmp_path: Path, staging: Path, fmt: str) -> None:
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    os.setxattr(root / "etc/os-release", "user.comment", b"hello")
    image = (make_squashfs if fmt == "squashfs" else make_ext4)(root, tmp_path / "img")
    expected = read_spec(root, staging)
    with open_update(str(image), staging=staging) as reader:
        assert reader.description == f"{fmt} image {image}"
        assert mounted_under(staging)
        got = read_all(reader)
        assert read_all(reader) == got
    assert shape(got) == shape(expected)  # ext's empty lost+found is not part of it
    release = next(m for m, _ in got if m.name == "etc/os-release")
    assert ("user.comment", b"hello") in release.xattrs
    assert not mounted_under(staging)
    assert list(staging.iterdir()) == []


@pytest.mark.root
def test_truncated_image_fails_and_leaves_nothing(tmp_path: Path, staging: Path) -> None:
    root = small_tree(tmp_path / "tree")
    image = make_squashfs(root, tmp_path / "img")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError), open_update(str(image), staging=staging) as reader:
        read_all(reader)  # mounting or reading fails
    assert not mounted_under(staging)
    assert list(staging.iterdir()) == []


def test_images_need_root(tmp_path: Path, staging: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"hsqs" + bytes(8000))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SourceError, match="needs root"), \
            open_update(str(image), staging=staging):
        pass
    assert list(staging.iterdir()) == []


# ------------------------------------------------------------------ checksums


def test_sha256_of_a_local_file(tree: Path, tmp_path: Path, staging: Path) -> None:
    archive = make_tar(tree, tmp_path / "u.tar")
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    got = read_spec(archive, staging, sha256=f"sha256:{good.upper()}")
    assert shape(got) == shape(read_spec(tree, staging))
    with pytest.raises(SourceError, match=f"SHA-256 is {good}, not {'0' * 64}"), \
            open_update(str(archive), staging=staging, sha256="0" * 64):
        pass
    with pytest.raises(UsageError, match="not a SHA-256 checksum"), \
            open_update(str(archive), staging=staging, sha256="abc"):
        pass
    with pytest.raises(UsageError, match="not a directory"), \
            open_update(str(tree), staging=staging, sha256=good):
        pass


# ------------------------------------------------------------------ downloads


class _Server(http.server.ThreadingHTTPServer):
    routes: dict[str, Callable[[_Handler], None]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


def send(body: bytes, *, length: int | None = None) -> Callable[[_Handler], None]:
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
    return route


def send_unsized(body: bytes) -> Callable[[_Handler], None]:
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body)
    return route


def redirect(to: str) -> Callable[[_Handler], None]:
    def route(handler: _Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, _Server]]:
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class _Progress:
    shown: list[int]

    def __init__(self, label: str) -> None:
        _Progress.shown.append(-1)

    def __call__(self, percent: int) -> None:
        _Progress.shown.append(percent)


def test_download(server: tuple[str, _Server], tree: Path, tmp_path: Path, staging: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, httpd = server
    archive = compress(make_cpio(tree, tmp_path / "u.cpio"), "gzip")
    body = archive.read_bytes()
    good = hashlib.sha256(body).hexdigest()
    httpd.routes = {"/updates.img": send(body), "/moved": redirect("/updates.img"),
                    "/unsized": send_unsized(body)}
    _Progress.shown = []
    monkeypatch.setattr(log, "Percent", _Progress)
    with open_update(f"{url}/updates.img", staging=staging, sha256=good) as reader:
        assert [p.name.startswith("download-") for p in staging.iterdir()] == [True]
        assert reader.description == f"gzip-compressed cpio archive {url}/updates.img"
        assert shape(read_all(reader)) == shape(read_spec(tree, staging))
    assert _Progress.shown[0] == -1 and _Progress.shown[-1] == 100
    assert list(staging.iterdir()) == []
    for path in ("/moved", "/unsized"):
        # the file downloaded is checked against the SHA-256 before it is read
        got = read_spec(f"{url}{path}", staging, sha256=good)
        assert shape(got) == shape(read_spec(tree, staging))
    assert list(staging.iterdir()) == []


def download_fails(spec: str, staging: Path, words: str, **kw: object) -> None:
    with pytest.raises(SourceError, match=words) as info, \
            open_update(spec, staging=staging, **kw):  # type: ignore[arg-type]
        pass
    assert "\n" not in info.value.message
    assert list(staging.iterdir()) == []


def test_download_failures(server: tuple[str, _Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/short": send(b"x" * 10, length=1000),
                    "/good": send(b"070701"),
                    "/to-ftp": redirect("ftp://127.0.0.1/x")}
    download_fails(f"{url}/missing", staging, r"cannot download .*/missing: HTTP 404 Not Found")
    download_fails(f"{url}/short", staging, "got 10 of 1000 bytes|connection broken")
    download_fails(f"{url}/to-ftp", staging, "redirected to ftp://127.0.0.1/x")
    download_fails(f"{url}/good", staging, f"SHA-256 is .*, not {'1' * 64}", sha256="1" * 64)


def test_connection_refused(staging: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    download_fails(f"http://127.0.0.1:{port}/u", staging, "Connection refused")


def test_no_answer_times_out(staging: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # accepted by the kernel, never answered
        port = s.getsockname()[1]
        download_fails(f"http://127.0.0.1:{port}/u", staging, "no answer for 0.3 s",
                       timeout=0.3)


def drip(every: float) -> Callable[[_Handler], None]:
    """A byte now and then: each read sees progress, the download never ends."""
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        with suppress(OSError):  # the client gave up
            for _ in range(100000):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(every)
    return route


def test_a_trickle_meets_the_deadline(server: tuple[str, _Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/slow": drip(0.05)}
    # each read brings a byte well within the stall timeout: only the deadline ends it
    download_fails(f"{url}/slow", staging, r"not done after 0.5 s \(\d+ B received\)",
                   timeout=5, deadline=0.5)


def test_sigterm_during_a_download_leaves_nothing(server: tuple[str, _Server],
                                                  tmp_path: Path) -> None:
    url, httpd = server
    httpd.routes = {"/slow": drip(0.05)}
    root, run = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    apply = subprocess.Popen(
        [sys.executable, "-m", "dmoverlay", "apply", f"{url}/slow", "--root", str(root),
         "--run-dir", str(run)], stderr=subprocess.PIPE, text=True)
    try:
        while not any((run / "dmoverlay").glob("staging-*/download-*")):
            assert apply.poll() is None, apply.communicate()
            time.sleep(0.02)
        apply.terminate()
        _, stderr = apply.communicate(timeout=60)
    finally:
        apply.kill()
    assert apply.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: terminated (SIGTERM); what was under way was undone"], stderr
    assert "Traceback" not in stderr
    assert list(run.iterdir()) == [] and list(root.iterdir()) == []


@pytest.mark.parametrize("spec", ["ftp://127.0.0.1/u.img", "file:///etc/passwd",
                                  "HTTPX://x/y"])
def test_other_url_schemes_are_refused(spec: str, staging: Path) -> None:
    download_fails(spec, staging, "URLs are not supported")
