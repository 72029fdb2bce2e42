"""The one tar reader, through both jobs that read tar archives: `build`
and `apply` refuse the same damaged or hostile archives, each with one
error line, and nothing written."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import dmoverlay

JOBS = ["build", "apply"]


def refused(tmp_path: Path, job: str, archive: Path) -> str:
    """Run `job` on `archive`; the one error line it ends with."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (tmp_path / "run").mkdir(exist_ok=True)
    out = tmp_path / "out.img"
    args = (["build", str(archive), "-o", str(out)] if job == "build"
            else ["apply", str(archive), "--root", str(root), "--run-dir", str(tmp_path / "run")])
    result = dmoverlay("-q", *args)
    assert result.returncode != 0, f"{job} accepted it"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert not out.exists() and list(root.iterdir()) == []
    return errors[0]


def member(name: str, data: bytes = b"x", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def header(name: bytes, kind: bytes, size: int) -> bytes:
    """One ustar header block, written by hand: its size field says what we
    like, whatever follows."""
    block = bytearray(512)
    block[:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_600_000_000
    block[156:157] = kind
    block[257:265] = b"ustar  \0"  # GNU's magic
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize("job", JOBS)
def test_a_damaged_second_header_is_refused(tmp_path: Path, job: str) -> None:
    """Issue 8: build took a tar whose second header was damaged as an
    archive of one member, and wrote an image missing all the others."""
    raw = bytearray(tar_bytes(member("a"), member("b"), member("c"), fmt=tarfile.GNU_FORMAT))
    raw[1024 + 148] ^= 0x01  # b's checksum
    archive = tmp_path / "damaged.tar"
    archive.write_bytes(bytes(raw))
    assert "unreadable tar header at offset 1024" in refused(tmp_path, job, archive)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("kind", [b"L", b"K", b"x", b"g"])
def test_a_huge_extension_header_is_refused_from_its_header(tmp_path: Path, job: str,
                                                            kind: bytes) -> None:
    """Issue 8: an 800 MB GNU long name or pax header (3.4 MB gzipped) took
    4 GB of RAM in tarfile.  This one only claims it: the cap answers from
    the header block, before anything is read."""
    archive = tmp_path / "huge.tar"
    archive.write_bytes(header(b"././@LongLink", kind, 800 << 20) + b"x" * 512 + bytes(1024))
    line = refused(tmp_path, job, archive)
    assert f"extension header of {800 << 20} bytes" in line


@pytest.mark.parametrize("job", JOBS)
def test_a_real_two_mib_pax_header_is_refused(tmp_path: Path, job: str) -> None:
    info, data = member("f")
    info.pax_headers = {"SCHILY.xattr.user.big": "v" * (2 << 20)}
    archive = tmp_path / "big.tar"
    archive.write_bytes(tar_bytes((info, data)))
    assert "at most 1048576 are read" in refused(tmp_path, job, archive)


@pytest.mark.parametrize("job", JOBS)
def test_a_chain_of_long_names_is_refused(tmp_path: Path, job: str) -> None:
    """tarfile reads each extension header by recursion: 100,000 in a row
    ended in a RecursionError."""
    chain = (header(b"././@LongLink", b"L", 10) + b"name".ljust(512, b"\0")) * 100_000
    archive = tmp_path / "chain.tar"
    archive.write_bytes(chain + tar_bytes(member("f"), fmt=tarfile.GNU_FORMAT))
    assert "extension headers in a row" in refused(tmp_path, job, archive)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(("pax", "words"), [
    ({"uid": str(2**40)}, "not a 32-bit owner"),
    ({"gid": str(2**32)}, "not a 32-bit owner"),
    ({"uid": "1" * 5000}, "unreadable uid"),  # tarfile reads it as 0: root
    ({"uid": "-5"}, "unreadable uid"),
    ({"size": str(10**30)}, "more than a file can hold"),
    ({"size": "12x"}, "unreadable size"),
    ({"mtime": "1e300"}, "outside what ext4 holds"),
    ({"mtime": "1e999999999"}, "outside what ext4 holds"),
    ({"mtime": str(2**34)}, "outside what ext4 holds"),
    ({"mtime": str(-(2**31) - 1)}, "outside what ext4 holds"),
])
def test_absurd_pax_numbers(tmp_path: Path, job: str, pax: dict[str, str], words: str) -> None:
    info, data = member("etc/motd", b"hi")
    info.pax_headers = pax
    archive = tmp_path / "absurd.tar"
    archive.write_bytes(tar_bytes((info, data)))
    assert words in refused(tmp_path, job, archive)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(("pax", "body", "words"), [
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
     b"99999999999\n", "sparse map of"),
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
     b"1\nx\n1\n", "unreadable"),
    # a line that never ends was grown and searched again at every block: quadratic
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
     b"1\n" + b"7" * 4000, "sparse map line over 20 digits"),
    ({"GNU.sparse.map": "0,1,x,1", "GNU.sparse.size": "10"}, b"", "unreadable"),
    ({"GNU.sparse.map": "5,2,0,2", "GNU.sparse.size": "10"}, b"", "sparse map out of order"),
    ({"GNU.sparse.map": "9,5", "GNU.sparse.size": "10"}, b"", "past the file's end"),
])
def test_hostile_sparse_maps(tmp_path: Path, job: str, pax: dict[str, str], body: bytes,
                             words: str) -> None:
    info, data = member("sparse", body.ljust(512, b"\0") if body else b"abcd")
    info.pax_headers = pax
    archive = tmp_path / "sparse.tar"
    archive.write_bytes(tar_bytes((info, data)))
    assert words in refused(tmp_path, job, archive)


@pytest.mark.parametrize("job", JOBS)
def test_a_negative_mtime_is_kept(tmp_path: Path, job: str) -> None:
    """Issue 8: build stored a pax mtime before 1970 as 2067."""
    info, data = member("old", b"1969")
    info.pax_headers = {"mtime": "-86400.5"}
    archive = tmp_path / "old.tar"
    archive.write_bytes(tar_bytes((info, data)))
    want = -86400 * 10**9 - 500_000_000
    if job == "apply":
        root = tmp_path / "root"
        root.mkdir()
        (tmp_path / "run").mkdir()
        result = dmoverlay("-q", "apply", str(archive), "--root", str(root),
                           "--run-dir", str(tmp_path / "run"))
        assert result.returncode == 0, result.stderr
        assert os.lstat(root / "old").st_mtime_ns == want
        return
    if os.geteuid() != 0:
        pytest.skip("the image is loop-mounted")
    from tests.treecheck import mounted_rootfs

    out = tmp_path / "out.img"
    result = dmoverlay("-q", "build", str(archive), "-o", str(out))
    assert result.returncode == 0, result.stderr
    with mounted_rootfs(out, tmp_path) as image:
        assert os.lstat(image / "old").st_mtime_ns == want


def sparse_tar(tmp_path: Path, fmt: str) -> tuple[Path, bytes]:
    """A 64 MiB file with three 4 KiB pieces of data, by GNU tar --sparse."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(64 << 20)
    for at in (0, 5 << 20, (64 << 20) - 4096):
        data[at:at + 4096] = os.urandom(4096)
    with open(src / "disk.img", "wb") as f:
        f.truncate(len(data))
        for at in (0, 5 << 20, (64 << 20) - 4096):
            f.seek(at)
            f.write(data[at:at + 4096])
    archive = tmp_path / f"sparse-{fmt}.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", archive, "-C", src, "disk.img"],
                   check=True)
    return archive, bytes(data)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_apply_keeps_the_holes_of_a_sparse_member(tmp_path: Path, fmt: str) -> None:
    """Issue 8: apply wrote sparse members fully allocated."""
    archive, data = sparse_tar(tmp_path, fmt)
    root, run = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    result = dmoverlay("-q", "apply", str(archive), "--root", str(root), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert (root / "disk.img").read_bytes() == data
    assert os.lstat(root / "disk.img").st_blocks * 512 <= 256 << 10


@pytest.mark.root
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_build_keeps_the_holes_of_a_sparse_member(tmp_path: Path, fmt: str) -> None:
    from tests.treecheck import mounted_rootfs

    archive, data = sparse_tar(tmp_path, fmt)
    out = tmp_path / "out.img"
    result = dmoverlay("-q", "build", str(archive), "-o", str(out))
    assert result.returncode == 0, result.stderr
    with mounted_rootfs(out, tmp_path) as image:
        assert (image / "disk.img").read_bytes() == data
        assert os.lstat(image / "disk.img").st_blocks * 512 <= 256 << 10


def symlink_tar(tmp_path: Path, xattrs: dict[str, str]) -> Path:
    info = tarfile.TarInfo("link")
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "target", 1_600_000_000
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    archive = tmp_path / "link.tar"
    archive.write_bytes(tar_bytes(member("target"), (info, b"")))
    return archive


def test_apply_keeps_the_xattrs_of_a_symlink(tmp_path: Path) -> None:
    """Issue 8: apply set no xattr on a symlink.  The kernel keeps trusted.*
    and security.* there (as root)."""
    archive = symlink_tar(tmp_path, {"trusted.t": "1", "security.s": "2"})
    root, run = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    result = dmoverlay("-q", "apply", str(archive), "--root", str(root), "--run-dir", str(run),
                       "--allow-xattr", "trusted.t", "--allow-xattr", "security.s")
    assert result.returncode == 0, result.stderr
    link = root / "link"
    assert os.getxattr(link, "trusted.t", follow_symlinks=False) == b"1"
    assert os.getxattr(link, "security.s", follow_symlinks=False) == b"2"
    assert os.readlink(link) == "target"


def test_apply_refuses_a_user_xattr_on_a_symlink_in_one_line(tmp_path: Path) -> None:
    archive = symlink_tar(tmp_path, {"user.u": "1"})
    assert "the kernel keeps user.* xattrs on files and directories only" in \
        refused(tmp_path, "apply", archive)


@pytest.mark.root
def test_build_keeps_the_xattrs_of_a_symlink(tmp_path: Path) -> None:
    from tests.treecheck import mounted_rootfs

    archive = symlink_tar(tmp_path, {"trusted.t": "1", "security.s": "2"})
    out = tmp_path / "out.img"
    result = dmoverlay("-q", "build", str(archive), "-o", str(out))
    assert result.returncode == 0, result.stderr
    with mounted_rootfs(out, tmp_path) as image:
        assert os.getxattr(image / "link", "trusted.t", follow_symlinks=False) == b"1"
        assert os.getxattr(image / "link", "security.s", follow_symlinks=False) == b"2"


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body)
    for _ in range(3):  # the length counts its own digits
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def raw_pax_tar(tmp_path: Path, *records: bytes) -> Path:
    """A pax header of records written by hand (tarfile writes keys as
    strict UTF-8), then the file "f"."""
    pax = b"".join(records)
    pad = bytes(-len(pax) % 512)
    archive = tmp_path / "raw.tar"
    archive.write_bytes(header(b"PaxHeaders/f", b"x", len(pax)) + pax + pad
                        + header(b"f", b"0", 2) + b"hi".ljust(512, b"\0") + bytes(1024))
    return archive


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(("record", "words"), [
    (pax_record(b"SCHILY.xattr.", b"v"), "no namespace"),
    (pax_record(b"SCHILY.xattr.user.", b"v"), "no namespace"),
    (pax_record(b"SCHILY.xattr.foo", b"v"), "no namespace"),
    (pax_record(b"SCHILY.xattr.system.data", b"v"), "no namespace"),
    (pax_record(b"SCHILY.xattr.user." + b"n" * 300, b"v"), "longer than 255"),
    (pax_record(b"SCHILY.xattr.system.posix_acl_access", b"garbage"),
     "xattr '?system.posix_acl_access'?: not a POSIX ACL|ea_set: Invalid argument"),
])
def test_hostile_xattrs(tmp_path: Path, job: str, record: bytes, words: str) -> None:
    """Before: apply ended in a traceback from setxattr, build stored names
    the kernel never shows."""
    assert re.search(words, refused(tmp_path, job, raw_pax_tar(tmp_path, record)))


def test_an_xattr_name_that_is_not_utf8_is_kept(tmp_path: Path) -> None:
    """Before: build ended in a traceback (the UUID digest encoded it)."""
    archive = raw_pax_tar(tmp_path, pax_record(b"SCHILY.xattr.user.\xff", b"v"))
    result = dmoverlay("-q", "build", str(archive), "-o", str(tmp_path / "out.img"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("major", "minor"), [(2**40, 1), (4096, 1), (1, 2**20)])
def test_a_device_number_linux_cannot_hold_is_refused(tmp_path: Path, major: int,
                                                      minor: int) -> None:
    """Before: build stored 4096:1 as something else, and ended in debugfs's
    usage text for 2**40 (apply refuses every device node anyway)."""
    info = tarfile.TarInfo("dev/x")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, major, minor
    archive = tmp_path / "dev.tar"
    archive.write_bytes(tar_bytes((info, b""), fmt=tarfile.GNU_FORMAT))
    assert "is not one Linux numbers" in refused(tmp_path, "build", archive)


@pytest.mark.parametrize("job", JOBS)
def test_a_plain_header_time_past_2446_is_refused(tmp_path: Path, job: str) -> None:
    """A plain header's 12 octal digits (no NUL) reach the year 6325: the
    fast header reader leaves such a header to the checked one."""
    block = bytearray(header(b"f", b"0", 2))
    block[136:148] = b"%012o" % (2**34)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    archive = tmp_path / "late.tar"
    archive.write_bytes(bytes(block) + b"hi".ljust(512, b"\0") + bytes(1024))
    assert "outside what ext4 holds" in refused(tmp_path, job, archive)
