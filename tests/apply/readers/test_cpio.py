"""The cpio parser: archives built byte by byte, and archives GNU cpio made."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmoverlay.apply.readers import cpio
from dmoverlay.apply.readers.cpio import Format, read_members
from dmoverlay.core.entries import Kind, Member, member_name
from dmoverlay.core.errors import SourceError

REG = stat.S_IFREG


def _pad(data: bytes, align: int) -> bytes:
    return data + bytes(-len(data) % align)


def newc(name: str, data: bytes = b"", *, mode: int = REG | 0o644, ino: int = 1,
         nlink: int = 1, uid: int = 0, gid: int = 0, mtime: int = 0,
         dev: tuple[int, int] = (8, 1), rdev: tuple[int, int] = (0, 0),
         magic: bytes = b"070701", check: int | None = None,
         namesize: int | None = None) -> bytes:
    raw_name = os.fsencode(name) + b"\0"
    if check is None:
        check = sum(data) & 0xFFFFFFFF if magic == b"070702" and stat.S_ISREG(mode) else 0
    fields = (ino, mode, uid, gid, nlink, mtime, len(data), *dev, *rdev,
              len(raw_name) if namesize is None else namesize, check)
    header = magic + b"".join(b"%08X" % f for f in fields)
    return _pad(_pad(header + raw_name, 4) + data, 4)


def crc(name: str, data: bytes = b"", **kw: Any) -> bytes:
    return newc(name, data, magic=b"070702", **kw)


def odc(name: str, data: bytes = b"", *, mode: int = REG | 0o644, ino: int = 1,
        nlink: int = 1, uid: int = 0, gid: int = 0, mtime: int = 0, dev: int = 0x801,
        rdev: int = 0) -> bytes:
    raw_name = os.fsencode(name) + b"\0"
    header = b"070707" + b"".join(b"%06o" % f for f in (dev, ino, mode, uid, gid, nlink, rdev))
    header += b"%011o" % mtime + b"%06o" % len(raw_name) + b"%011o" % len(data)
    return header + raw_name + data


def binary(name: str, data: bytes = b"", *, order: str = "<", mode: int = REG | 0o644,
           ino: int = 1, nlink: int = 1, mtime: int = 0, rdev: int = 0) -> bytes:
    raw_name = os.fsencode(name) + b"\0"
    header = struct.pack(f"{order}13H", 0o070707, 0x801, ino, mode, 0, 0, nlink, rdev,
                         mtime >> 16, mtime & 0xFFFF, len(raw_name),
                         len(data) >> 16, len(data) & 0xFFFF)
    return _pad(_pad(header + raw_name, 2) + data, 2)


def trailer(make: Callable[..., bytes] = newc) -> bytes:
    return make("TRAILER!!!", mode=0, ino=0)


def members(archive: bytes) -> list[tuple[Member, bytes | None]]:
    out = []
    for member, data in read_members(io.BytesIO(archive), where="test.cpio"):
        out.append((member, None if data is None else data.read()))
    return out


def fails(archive: bytes, match: str) -> str:
    with pytest.raises(SourceError, match=match) as info:
        members(archive)
    assert "\n" not in info.value.message
    return info.value.message


# ----------------------------------------------------------------- the basics


def test_every_kind_of_entry_with_its_metadata() -> None:
    archive = b"".join([
        newc(".", mode=stat.S_IFDIR | 0o755, ino=2, mtime=1_600_000_000),
        newc("./usr/bin/ping", b"ping", mode=REG | 0o4755, ino=3, uid=0, gid=5),
        newc("lib", b"usr/lib", mode=stat.S_IFLNK | 0o777, ino=4),
        newc("dev/null", mode=stat.S_IFCHR | 0o666, ino=5, rdev=(1, 3)),
        newc("dev/loop9", mode=stat.S_IFBLK | 0o660, ino=6, rdev=(7, 9), gid=6),
        newc("run/initctl", mode=stat.S_IFIFO | 0o600, ino=7),
        newc("run/sock", mode=stat.S_IFSOCK | 0o755, ino=8),
        newc("home/user", mode=stat.S_IFDIR | 0o700, ino=9, uid=1000, gid=1000),
        trailer(),
    ])
    got = members(archive)
    assert got == [
        (Member("", Kind.DIR, 0o755, mtime_ns=1_600_000_000 * 10**9), None),
        (Member("usr/bin/ping", Kind.FILE, 0o4755, 0, 5, size=4), b"ping"),
        (Member("lib", Kind.SYMLINK, 0o777, target="usr/lib"), None),
        (Member("dev/null", Kind.CHAR, 0o666, rdev=(1, 3)), None),
        (Member("dev/loop9", Kind.BLOCK, 0o660, gid=6, rdev=(7, 9)), None),
        (Member("run/initctl", Kind.FIFO, 0o600), None),
        (Member("run/sock", Kind.SOCKET, 0o755), None),
        (Member("home/user", Kind.DIR, 0o700, 1000, 1000), None),
    ]


@pytest.mark.parametrize(("spelled", "name"), [
    (".", ""), ("./", ""), ("./a", "a"), ("a", "a"), ("../evil", "../evil"),
    ("/etc/passwd", "/etc/passwd"), ("././x", "./x"), ("a/../../b", "a/../../b"),
    ("usr/", "usr/"),
])
def test_names_come_out_as_spelled_but_for_a_leading_dot_slash(spelled: str,
                                                                name: str) -> None:
    assert member_name(spelled) == name
    got = members(newc(spelled, b"x") + trailer())
    assert got[0][0].name == name


def test_names_that_are_not_utf8_round_trip() -> None:
    raw = b"caf\xe9"
    [(member, _)] = members(newc(os.fsdecode(raw), b"x") + trailer())
    assert os.fsencode(member.name) == raw


def test_data_not_read_by_the_consumer_is_skipped() -> None:
    archive = newc("a", b"A" * 1001) + newc("b", b"B" * 3) + trailer()
    names = [m.name for m, _ in read_members(io.BytesIO(archive), where="x")]
    assert names == ["a", "b"]


def test_data_read_in_small_pieces() -> None:
    archive = crc("a", bytes(range(256)) * 10) + trailer(crc)
    stream = read_members(io.BytesIO(archive), where="x")
    _, data = next(stream)
    assert data is not None
    pieces = []
    while chunk := data.read(7):
        pieces.append(chunk)
    assert b"".join(pieces) == bytes(range(256)) * 10
    assert list(stream) == []


@pytest.mark.parametrize("order", ["<", ">"])
def test_old_binary_format_in_either_byte_order(order: str) -> None:
    archive = b"".join([
        binary("odd", b"abc", order=order, mtime=1_700_000_000, ino=1),
        binary("dev/null", order=order, mode=stat.S_IFCHR | 0o666, rdev=0x103, ino=2),
        binary("TRAILER!!!", order=order, mode=0, ino=0),
    ])
    got = members(archive)
    assert got[0] == (Member("odd", Kind.FILE, size=3, mtime_ns=1_700_000_000 * 10**9), b"abc")
    assert got[1][0].rdev == (1, 3)


def test_odc_device_numbers_and_times() -> None:
    archive = odc("dev/sda", mode=stat.S_IFBLK | 0o660, rdev=os.makedev(8, 0),
                  mtime=4_102_444_800) + trailer(odc)
    [(member, _)] = members(archive)
    assert member.rdev == (8, 0) and member.mtime_ns == 4_102_444_800 * 10**9


def test_split_dev_matches_the_c_library() -> None:
    for major, minor in [(0, 0), (1, 3), (8, 17), (259, 5), (4095, 255), (4096, 1 << 19)]:
        assert cpio.split_dev(os.makedev(major, minor)) == (major, minor)


# ------------------------------------------------------------------ checksums


def test_crc_checksum_is_verified() -> None:
    good = crc("a", b"hello") + trailer(crc)
    assert members(good)[0][1] == b"hello"
    bad = crc("a", b"hello", check=sum(b"hello") + 1) + trailer(crc)
    fails(bad, r"test.cpio: 'a' \(entry at offset 0\): checksum mismatch")


def test_crc_checksum_is_verified_when_the_data_is_skipped() -> None:
    bad = crc("a", b"hello", check=1) + trailer(crc)
    with pytest.raises(SourceError, match="checksum mismatch"):
        for _ in read_members(io.BytesIO(bad), where="x"):
            pass


def test_crc_of_an_empty_file_must_be_zero() -> None:
    fails(crc("a", b"", check=5) + trailer(crc), "checksum mismatch")


def test_crc_symlinks_carry_no_checksum() -> None:
    # GNU cpio writes 0 for a symlink's target; only regular files are summed.
    archive = crc("l", b"target", mode=stat.S_IFLNK | 0o777, check=0) + trailer(crc)
    assert members(archive)[0][0].target == "target"


def test_newc_ignores_the_checksum_field() -> None:
    archive = newc("a", b"x", check=12345) + trailer()
    assert members(archive)[0][1] == b"x"


# ------------------------------------------------------------------ hardlinks


def test_newc_hardlinks_come_after_the_entry_that_carries_the_data() -> None:
    # GNU cpio: size-0 entries for all names but the last, which has the data.
    archive = b"".join([
        newc("c", ino=7, nlink=3, mode=REG | 0o755),
        newc("dir", mode=stat.S_IFDIR | 0o755, ino=8, nlink=2),
        newc("b", ino=7, nlink=3, mode=REG | 0o755),
        newc("a", b"data", ino=7, nlink=3, mode=REG | 0o755),
        newc("z", b"unrelated", ino=9),
        trailer(),
    ])
    got = [(m.name, m.kind, m.target, m.size, d) for m, d in members(archive)]
    assert got == [
        ("dir", Kind.DIR, "", 0, None),
        ("a", Kind.FILE, "", 4, b"data"),
        ("c", Kind.HARDLINK, "a", 0, None),
        ("b", Kind.HARDLINK, "a", 0, None),
        ("z", Kind.FILE, "", 9, b"unrelated"),
    ]


def test_newc_data_with_the_first_name_also_works() -> None:
    archive = newc("a", b"data", ino=7, nlink=2) + newc("b", ino=7, nlink=2) + trailer()
    got = [(m.name, m.kind, m.target) for m, _ in members(archive)]
    assert got == [("a", Kind.FILE, ""), ("b", Kind.HARDLINK, "a")]


def test_newc_hardlinked_empty_file_is_settled_at_the_trailer() -> None:
    archive = newc("./e2", ino=5, nlink=2) + newc("./e", ino=5, nlink=2) + trailer()
    got = [(m.name, m.kind, m.target, d) for m, d in members(archive)]
    assert got == [("e", Kind.FILE, "", b""), ("e2", Kind.HARDLINK, "e", None)]


def test_newc_inode_numbers_are_per_device() -> None:
    archive = b"".join([
        newc("a", b"A", ino=7, nlink=2, dev=(8, 1)),
        newc("b", b"B", ino=7, nlink=2, dev=(8, 2)),
        trailer(),
    ])
    assert [m.kind for m, _ in members(archive)] == [Kind.FILE, Kind.FILE]


def test_odc_hardlinks_repeat_the_data_and_link_to_the_first_name() -> None:
    archive = b"".join([
        odc("a", b"data", ino=7, nlink=2),
        odc("b", b"data", ino=7, nlink=2),
        trailer(odc),
    ])
    got = [(m.name, m.kind, m.target, d) for m, d in members(archive)]
    assert got == [("a", Kind.FILE, "", b"data"), ("b", Kind.HARDLINK, "a", None)]


def test_odc_inode_numbers_that_merely_collide_are_not_links() -> None:
    # odc keeps 18 bits of the inode number: other fields must agree too.
    archive = b"".join([
        odc("a", b"one", ino=7, nlink=2, mtime=1),
        odc("b", b"two", ino=7, nlink=2, mtime=2),
        trailer(odc),
    ])
    assert [(m.kind, d) for m, d in members(archive)] == [(Kind.FILE, b"one"),
                                                          (Kind.FILE, b"two")]


def test_hardlinked_symlinks_and_devices_stay_what_they_are() -> None:
    archive = b"".join([
        newc("s1", b"t", mode=stat.S_IFLNK | 0o777, ino=3, nlink=2),
        newc("s2", b"t", mode=stat.S_IFLNK | 0o777, ino=3, nlink=2),
        newc("d1", mode=stat.S_IFCHR | 0o600, ino=4, nlink=2, rdev=(1, 3)),
        newc("d2", mode=stat.S_IFCHR | 0o600, ino=4, nlink=2, rdev=(1, 3)),
        trailer(),
    ])
    assert [m.kind for m, _ in members(archive)] == [Kind.SYMLINK, Kind.SYMLINK,
                                                     Kind.CHAR, Kind.CHAR]


# --------------------------------------------------- the end of the archive


def test_zero_padding_after_the_trailer_is_allowed() -> None:
    archive = newc("a", b"x") + trailer()
    assert members(archive + bytes(512 - len(archive) % 512))[0][1] == b"x"


def test_a_further_archive_after_the_trailer_is_read_too() -> None:
    # As the kernel reads an initramfs made of several archives; inode
    # numbers start afresh in each.
    first = newc("a", ino=5, nlink=2) + newc("b", b"1", ino=5, nlink=2) + trailer()
    second = newc("c", b"2", ino=5, nlink=2) + trailer()
    archive = first + bytes(-len(first) % 512) + second
    got = [(m.name, m.kind, m.target) for m, _ in members(archive)]
    assert got == [("b", Kind.FILE, ""), ("a", Kind.HARDLINK, "b"), ("c", Kind.FILE, "")]


def test_other_data_after_the_trailer_is_refused() -> None:
    archive = newc("a", b"x") + trailer()
    message = fails(archive + bytes(8) + b"\x1f\x8b\x08junk", "not a further cpio archive")
    assert f"at offset {len(archive) + 8}" in message


def test_missing_trailer() -> None:
    archive = newc("a", b"x")
    fails(archive, f"no TRAILER!!! entry before the end at offset {len(archive)}")


def test_empty_input() -> None:
    fails(b"", "no TRAILER!!! entry before the end at offset 0")


# -------------------------------------------------------------- malformed


def test_bad_magic_mid_stream_names_the_offset() -> None:
    first = newc("a", b"x")
    second = bytearray(newc("b", b"y"))
    second[:6] = b"070799"
    fails(first + bytes(second) + trailer(), f"not a cpio header .* at offset {len(first)}")


def test_non_hex_field() -> None:
    raw = bytearray(newc("a", b"x"))
    raw[6 + 8:6 + 16] = b"0000G1A4"  # mode
    fails(bytes(raw) + trailer(), "header field mode is not hexadecimal .* at offset 0")


def test_signs_and_spaces_are_not_digits() -> None:
    raw = bytearray(newc("a", b"x"))
    raw[6:14] = b"+0000001"  # ino: int() would take it
    fails(bytes(raw) + trailer(), "field ino is not hexadecimal")
    raw = bytearray(odc("a", b"x"))
    raw[6:12] = b" 00801"
    fails(bytes(raw) + trailer(odc), "field dev is not octal")


def test_octal_field_with_an_eight() -> None:
    raw = bytearray(odc("a", b"x"))
    raw[18:24] = b"100648"  # mode
    fails(bytes(raw) + trailer(odc), "field mode is not octal")


@pytest.mark.parametrize("size", [0, 4098, 0xFFFFFFFF])
def test_impossible_name_size(size: int) -> None:
    fails(newc("a", b"x", namesize=size) + trailer(), f"impossible name size {size}")


def test_name_not_ended_by_nul() -> None:
    raw = newc("ab", b"x", namesize=2)  # "a" "b" then the NUL falls outside
    fails(raw + trailer(), "name not ended by a NUL byte at offset 0")


def test_name_holding_nul() -> None:
    fails(newc("a\0b", b"x") + trailer(), "name holds a NUL byte")


def test_unknown_file_type() -> None:
    fails(newc("a", b"x", mode=0o170644) + trailer(), "unknown file type 0o170000")


def test_overlong_symlink_target() -> None:
    fails(newc("l", b"x" * 5000, mode=stat.S_IFLNK | 0o777) + trailer(),
          "symlink target of 5000 bytes")


def test_truncated_header_name_and_data() -> None:
    archive = newc("name", b"0123456789") + trailer()
    fails(archive[:50], r"truncated header \(44 of 104 bytes\) at offset 6")
    fails(archive[:112], r"truncated name \(2 of 5 bytes\) at offset 110")
    fails(archive[:120], r"truncated data of 'name' \(4 of 10 bytes\) at offset 116")


def test_every_cut_before_the_trailer_ends_is_an_error() -> None:
    archive = b"".join([
        crc(".", mode=stat.S_IFDIR | 0o755, ino=1),
        crc("f", b"some data", ino=2),
        crc("l", b"f", mode=stat.S_IFLNK | 0o777, ino=3),
        crc("h1", ino=4, nlink=2),
        crc("h2", b"linked", ino=4, nlink=2),
        trailer(crc),
    ])
    for cut in range(len(archive)):
        with pytest.raises(SourceError):
            members(archive[:cut])
    assert len(members(archive)) == 5


# ----------------------------------------------------------- GNU cpio itself

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")


def _gnu_tree(root: Path) -> None:
    (root / "d/sub").mkdir(parents=True)
    (root / "d/a").write_bytes(b"hello\n")
    os.link(root / "d/a", root / "b")
    os.link(root / "d/a", root / "d/sub/c")
    (root / "empty").write_bytes(b"")
    os.link(root / "empty", root / "empty2")
    (root / "big").write_bytes(os.urandom(70_001))
    os.symlink("d/a", root / "sym")
    os.symlink("/nowhere", root / "dangling")
    os.chmod(root / "big", 0o4750)
    os.utime(root / "big", (1_234_567_890, 1_234_567_890))
    os.mkfifo(root / "fifo")


def _gnu_cpio(root: Path, *args: str) -> bytes:
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    return subprocess.run(["cpio", "-o", "--quiet", *args], cwd=root, input=names,
                          capture_output=True, check=True).stdout


@needs_cpio
@pytest.mark.parametrize("args", [["-H", "newc"], ["-H", "crc"], ["-H", "odc"], ["-H", "bin"],
                                  ["-c"], ["-H", "newc", "--reproducible"]])
def test_archives_made_by_gnu_cpio(tmp_path: Path, args: list[str]) -> None:
    _gnu_tree(tmp_path)
    got = members(_gnu_cpio(tmp_path, *args))
    by_name = {m.name: (m, d) for m, d in got}
    assert set(by_name) == {"", "d", "d/sub", "d/a", "b", "d/sub/c", "empty", "empty2",
                            "big", "sym", "dangling", "fifo"}
    seen: set[str] = set()
    for member, _ in got:  # every HARDLINK names a FILE seen before it
        if member.kind is Kind.HARDLINK:
            assert by_name[member.target][0].kind is Kind.FILE and member.target in seen
        seen.add(member.name)
    groups: dict[str, set[str]] = {}
    for member, _ in got:
        if member.kind is Kind.HARDLINK:
            groups.setdefault(member.target, {member.target}).add(member.name)
    assert {frozenset(g) for g in groups.values()} == {
        frozenset({"d/a", "b", "d/sub/c"}), frozenset({"empty", "empty2"})}
    data = {m.name: d for m, d in got if m.kind is Kind.FILE}
    hello = next(c for c in groups if c in {"d/a", "b", "d/sub/c"})
    assert data[hello] == b"hello\n"
    assert data["big"] == (tmp_path / "big").read_bytes()
    big = by_name["big"][0]
    assert big.mode == 0o4750 and big.mtime_ns == 1_234_567_890 * 10**9
    assert by_name["sym"][0].target == "d/a"
    assert by_name["dangling"][0].target == "/nowhere"
    assert by_name["fifo"][0].kind is Kind.FIFO
    assert by_name["d/sub"][0].kind is Kind.DIR


@needs_cpio
def test_gnu_cpio_dash_c_format_is_detected(tmp_path: Path) -> None:
    # GNU cpio's -c is newc when built with SVR4_COMPAT, else odc (Debian).
    (tmp_path / "f").write_bytes(b"x")
    assert cpio.detect(_gnu_cpio(tmp_path, "-c")) in (Format.NEWC, Format.ODC)


@needs_cpio
def test_gnu_cpio_lists_what_we_read(tmp_path: Path) -> None:
    _gnu_tree(tmp_path)
    archive = _gnu_cpio(tmp_path, "-H", "newc")
    listed = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True,
                            check=True).stdout.decode().split()
    assert sorted(member_name(n) for n in listed) == sorted(m.name for m, _ in members(archive))
