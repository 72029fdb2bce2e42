"""Reading sources into a manifest: archives unpacked as names and data only."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from dmoverlay.build.source import check_name, is_tar, read_directory, read_tar, tar_path
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import SourceError
from tests import samples


def test_sparse_member_stays_sparse_when_unpacked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    archive = tmp_path / "a.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", str(archive), "-C", str(src),
                    "."], check=True)
    t = read_tar(archive, tmp_path / "staging")
    entry = next(e for e in t.entries if e.path == "sparse")
    staged = tmp_path / "staging/sparse"
    assert staged.stat().st_size == (64 << 20) + 3
    assert staged.stat().st_blocks * 512 < 1 << 20
    assert entry.size < 1 << 20  # what it occupies, not its length
    assert staged.read_bytes()[-3:] == b"end"


def test_archive_metadata_comes_from_the_headers(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("usr/bin/ping")
        info.size, info.mode, info.uid, info.gid = 4, 0o4755, 0, 5
        info.pax_headers = {"mtime": "1600000000.123456789",
                            "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}
        tar.addfile(info, io.BytesIO(b"ping"))
        dev = tarfile.TarInfo("dev/null")
        dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(dev)
    archive = tmp_path / "a.tar"
    archive.write_bytes(buf.getvalue())
    t = read_tar(archive, tmp_path / "staging")
    by_path = {e.path: e for e in t.entries}
    ping = by_path["usr/bin/ping"]
    assert (ping.mode, ping.uid, ping.gid) == (0o4755, 0, 5)
    assert ping.mtime_ns == 1_600_000_000_123_456_789
    assert ping.xattrs == (("security.capability", b"\x01\x00\x00\x02"),)
    assert by_path["dev/null"].kind is Kind.CHAR and by_path["dev/null"].rdev == (1, 3)
    assert by_path["usr"].kind is Kind.DIR  # implied parents are made
    # the staging copy holds only a name for the device: no privilege needed
    assert (tmp_path / "staging/dev/null").is_file()


def test_v7_archive_is_recognised(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    raw = bytearray(buf.getvalue())
    raw[257:265] = bytes(8)  # no ustar magic, as in a v7 archive
    raw[148:156] = b"%06o\0 " % (sum(raw[:148]) + 8 * 32 + sum(raw[156:512]))
    archive = tmp_path / "v7.tar"
    archive.write_bytes(bytes(raw))
    assert is_tar(archive)
    raw[0] ^= 1
    archive.write_bytes(bytes(raw))
    assert not is_tar(archive)


def test_directory_manifest(tmp_path: Path) -> None:
    root = tmp_path / "t"
    samples.make_plain_tree(root)
    t = read_directory(root)
    by_path = {e.path: e for e in t.entries}
    assert by_path["lib"].kind is Kind.SYMLINK and by_path["lib"].target == "usr/lib"
    assert by_path["usr/bin/tool-again"].link_to == "usr/bin/tool"
    assert by_path["etc/os-release"].mtime_ns == 1_600_000_000_123_456_789
    assert by_path["var/sparse.img"].size < 1 << 20
    assert t.newest_mtime() >= 4_102_444_800
    assert os.fspath(t.root) == os.fspath(root)


@pytest.mark.parametrize(("name", "path"), [
    ("./usr/bin/ls", "usr/bin/ls"), ("/etc/passwd", "etc/passwd"), ("a//b/./c/", "a/b/c"),
    ("./", ""), ("ünï cödé", "ünï cödé"),
    ("bad\nname", "bad\nname"), ("tab\there", "tab\there"), ("del\x7f", "del\x7f"),
])
def test_tar_path(name: str, path: str) -> None:
    assert tar_path(name) == path


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/..", "x" * 256])
def test_tar_path_refuses(name: str) -> None:
    with pytest.raises(SourceError):
        tar_path(name)


def test_name_length_counts_bytes() -> None:
    check_name("ok", "é" * 127)  # 254 bytes
    with pytest.raises(SourceError, match="255 bytes"):
        check_name("long", "é" * 128)
