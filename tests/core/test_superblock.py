"""The superblock parsers on bytes: every check, every field, no tools."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.core.errors import ImageError
from dmoverlay.core.superblock import (
    COMPRESSORS,
    Kind,
    crc32c,
    detect,
    feature_names,
    iso_time,
    parse_ext4,
    parse_squashfs,
)

# ------------------------------------------------------------------- squashfs

ABSENT = 0xFFFF_FFFF_FFFF_FFFF
SQUASHFS_FIELDS: dict[str, int | bytes] = {
    # A real superblock (mksquashfs 4.5.1 -comp xz, LiveOS/rootfs.img inside).
    "magic": b"hsqs", "inodes": 3, "mkfs_time": 1_700_000_000, "block_size": 131072,
    "fragments": 0, "compression": 4, "block_log": 17, "flags": 0xC0, "ids": 1,
    "major": 4, "minor": 0, "root_inode": 0x858, "bytes_used": 0x1334,
    "id_table": 0x132C, "xattr_table": ABSENT, "inode_table": 0x122C,
    "directory_table": 0x12CA, "fragment_table": 0x1304, "lookup_table": 0x131E,
}


def squashfs_sb(**changes: int | bytes) -> bytes:
    f = {**SQUASHFS_FIELDS, **changes}
    return struct.pack("<4sIIIIHHHHHHQQQQQQQQ", *f.values())


def test_squashfs_fields() -> None:
    info = parse_squashfs(squashfs_sb(), size=8192)
    assert info.version == "4.0"
    assert info.compression == "xz"
    assert info.block_size == 131072
    assert info.inodes == 3
    assert info.bytes_used == 0x1334
    assert info.mkfs_time == 1_700_000_000
    assert info.flags == ("duplicates", "exportable")
    assert info.to_dict()["mkfs_time"] == "2023-11-14T22:13:20Z"


@pytest.mark.parametrize(("number", "name"), sorted(COMPRESSORS.items()))
def test_squashfs_compressors(number: int, name: str) -> None:
    assert parse_squashfs(squashfs_sb(compression=number)).compression == name


def test_squashfs_compressor_names() -> None:
    assert COMPRESSORS == {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}


def test_squashfs_exact_size_is_whole() -> None:
    assert parse_squashfs(squashfs_sb(), size=0x1334).bytes_used == 0x1334


def test_squashfs_truncated() -> None:
    with pytest.raises(ImageError, match=r"squashfs is truncated: .* 4916 bytes .* only 4915"):
        parse_squashfs(squashfs_sb(), size=0x1333)


@pytest.mark.parametrize(("changes", "message"), [
    ({"magic": b"hsqt"}, "not a squashfs"),
    ({"major": 3, "minor": 1}, "version 3.1 is not supported"),
    ({"minor": 1}, "version 4.1 is not supported"),
    ({"block_size": 12345}, "block size 12345 is not a power of two"),
    ({"block_size": 2048, "block_log": 11}, "block size 2048"),
    ({"block_size": 2 << 20, "block_log": 21}, "block size 2097152"),
    ({"block_log": 16}, "block log 16 does not match block size 131072"),
    ({"compression": 0}, "unknown compression id 0"),
    ({"compression": 7}, "unknown compression id 7"),
    ({"inodes": 0}, "no inodes"),
    ({"inode_table": 0x12CA}, "inode and directory tables are out of place"),
    ({"directory_table": 0x1400}, "inode and directory tables are out of place"),
    ({"inode_table": 10}, "inode and directory tables are out of place"),
    ({"id_table": 0x2000}, "id table is out of place"),
    ({"id_table": 0x1000}, "id table is out of place"),
    ({"fragment_table": 0x9999}, "fragment, export or xattr table is out of place"),
    ({"xattr_table": 0x1335}, "fragment, export or xattr table is out of place"),
    ({"root_inode": 0x100 << 16}, "root inode is outside the inode table"),
    ({"root_inode": 0x2000}, "root inode is outside the inode table"),
])
def test_squashfs_corrupt(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageError, match=message) as caught:
        parse_squashfs(squashfs_sb(**changes), size=1 << 20)
    assert caught.value.hint


def test_squashfs_absent_tables_are_fine() -> None:
    info = parse_squashfs(squashfs_sb(fragment_table=ABSENT, lookup_table=ABSENT))
    assert info.inodes == 3


def test_squashfs_too_short() -> None:
    with pytest.raises(ImageError, match="too short for a squashfs superblock"):
        parse_squashfs(squashfs_sb()[:95])


@given(st.binary(min_size=0, max_size=200))
def test_squashfs_garbage_is_one_clear_error(tail: bytes) -> None:
    """Whatever follows the magic, the answer is a report or an ImageError."""
    try:
        parse_squashfs(b"hsqs" + tail, size=len(tail) + 4)
    except ImageError as exc:
        assert exc.message


# ------------------------------------------------------------------------ ext

UUID = "11111111-2222-3333-4444-555555555555"
EXT4_COMPAT = 0x4 | 0x8 | 0x10 | 0x20  # has_journal ext_attr resize_inode dir_index
EXT4_INCOMPAT = 0x2 | 0x40 | 0x80 | 0x200  # filetype extent 64bit flex_bg
EXT4_RO_COMPAT = 0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x400  # ... metadata_csum


def ext_sb(*, blocks: int = 16384, free_blocks: int = 1000, inodes: int = 4096,
           free_inodes: int = 4000, log_block: int = 2, compat: int = EXT4_COMPAT,
           incompat: int = EXT4_INCOMPAT, ro_compat: int = EXT4_RO_COMPAT, rev: int = 1,
           first_ino: int = 11, inode_size: int = 256, label: bytes = b"Anaconda",
           state: int = 1, mkfs_time: int = 1_700_000_000, mkfs_time_hi: int = 0,
           mtime: int = 0, wtime: int = 1_700_000_100, checksum: bool = True) -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<IIIII", sb, 0, inodes, blocks & 0xFFFFFFFF, 0,
                     free_blocks & 0xFFFFFFFF, free_inodes)
    struct.pack_into("<I", sb, 0x18, log_block)
    struct.pack_into("<III", sb, 0x20, 32768, 32768, 8192)
    struct.pack_into("<II", sb, 0x2C, mtime, wtime)
    struct.pack_into("<HH", sb, 0x38, 0xEF53, state)
    struct.pack_into("<I", sb, 0x4C, rev)
    struct.pack_into("<IH", sb, 0x54, first_ino, inode_size)
    struct.pack_into("<III", sb, 0x5C, compat, incompat, ro_compat)
    sb[0x68:0x78] = uuid.UUID(UUID).bytes
    sb[0x78:0x78 + len(label)] = label
    struct.pack_into("<I", sb, 0x108, mkfs_time)
    struct.pack_into("<II", sb, 0x150, blocks >> 32, 0)
    struct.pack_into("<I", sb, 0x158, free_blocks >> 32)
    sb[0x175] = 1
    sb[0x276] = mkfs_time_hi
    return with_checksum(sb) if checksum else bytes(sb)


def with_checksum(sb: bytearray) -> bytes:
    """ext4's superblock checksum: crc32c without the final inversion."""
    struct.pack_into("<I", sb, 0x3FC, crc32c(bytes(sb[:0x3FC])) ^ 0xFFFFFFFF)
    return bytes(sb)


def test_ext4_fields() -> None:
    info = parse_ext4(ext_sb(), size=64 << 20)
    assert info.fs_type == "ext4"
    assert info.label == "Anaconda"
    assert info.uuid == UUID
    assert info.block_size == 4096
    assert (info.blocks, info.size) == (16384, 64 << 20)
    assert (info.free_blocks, info.free) == (1000, 1000 * 4096)
    assert (info.inodes, info.free_inodes) == (4096, 4000)
    assert info.reserved_inodes == 10
    assert info.files == 86  # 96 in use, less inodes 1..10
    assert info.features == ("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype",
                             "extent", "64bit", "flex_bg", "sparse_super", "large_file",
                             "huge_file", "dir_nlink", "extra_isize", "metadata_csum")
    assert info.state == "clean"
    assert info.mkfs_time == 1_700_000_000
    assert info.last_mount_time is None
    assert info.last_write_time == 1_700_000_100
    d = info.to_dict()
    assert d["mkfs_time"] == "2023-11-14T22:13:20Z"
    assert d["last_mount_time"] is None
    assert d["files"] == 86
    assert d["fs_size"] == 64 << 20


def test_quota_and_orphan_file_inodes_are_not_files() -> None:
    sb = bytearray(ext_sb(compat=EXT4_COMPAT | 0x1000, ro_compat=EXT4_RO_COMPAT | 0x100))
    # user and group quota in reserved inodes 3 and 4, project quota in 12,
    # the orphan file in 13 (what mke2fs 1.47 -O quota,project,orphan_file does)
    struct.pack_into("<II", sb, 0x240, 3, 4)
    struct.pack_into("<I", sb, 0x26C, 12)
    struct.pack_into("<I", sb, 0x280, 13)
    info = parse_ext4(with_checksum(sb))
    assert info.hidden_inodes == (12, 13)
    assert info.reserved_inodes == 12
    assert info.files == 96 - 12


def test_ext4_64bit_counts_use_the_high_words() -> None:
    info = parse_ext4(ext_sb(blocks=(1 << 32) + 5, free_blocks=(1 << 32) + 1))
    assert info.blocks == (1 << 32) + 5
    assert info.free_blocks == (1 << 32) + 1


def test_ext4_high_words_ignored_without_64bit() -> None:
    sb = ext_sb(blocks=(1 << 32) + 5, free_blocks=1, incompat=EXT4_INCOMPAT & ~0x80)
    assert parse_ext4(sb).blocks == 5


def test_ext4_time_past_2106() -> None:
    info = parse_ext4(ext_sb(mkfs_time=5, mkfs_time_hi=1))
    assert info.mkfs_time == (1 << 32) + 5
    assert iso_time(info.mkfs_time) == "2106-02-07T06:28:21Z"


@pytest.mark.parametrize(("compat", "incompat", "ro_compat", "kind"), [
    (0x8 | 0x10 | 0x20, 0x2, 0x1 | 0x2, "ext2"),
    (0x4 | 0x8 | 0x10 | 0x20, 0x2, 0x1 | 0x2, "ext3"),
    (0x4, 0x2 | 0x40, 0x1, "ext4"),  # extents
    (0x0, 0x2, 0x1 | 0x8, "ext4"),  # huge_file, no journal: still ext4
])
def test_ext_type(compat: int, incompat: int, ro_compat: int, kind: str) -> None:
    assert parse_ext4(ext_sb(compat=compat, incompat=incompat, ro_compat=ro_compat)).fs_type \
        == kind


def test_ext_revision_0_defaults() -> None:
    info = parse_ext4(ext_sb(rev=0, first_ino=0, inode_size=0, ro_compat=0x1, incompat=0x2))
    assert (info.first_inode, info.inode_size) == (11, 128)


@pytest.mark.parametrize(("state", "name"), [(1, "clean"), (0, "not clean"), (3, "errors")])
def test_ext_state(state: int, name: str) -> None:
    assert parse_ext4(ext_sb(state=state)).state == name


def test_unknown_features_are_named_like_e2fsprogs() -> None:
    assert feature_names(1 << 13, 1 << 31, 1 << 2) == ("FEATURE_C13", "FEATURE_I31",
                                                     "FEATURE_R2")


def test_ext4_truncated() -> None:
    with pytest.raises(ImageError, match=r"ext filesystem is truncated: .* 67108864 bytes"):
        parse_ext4(ext_sb(), size=(64 << 20) - 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"log_block": 7}, "block size"),
    ({"blocks": 0}, "no blocks or no inodes"),
    ({"inodes": 0, "free_inodes": 0}, "no blocks or no inodes"),
    ({"free_blocks": 20000}, "more free blocks or inodes"),
    ({"free_inodes": 5000}, "more free blocks or inodes"),
    ({"rev": 2}, "unknown revision 2"),
    ({"first_ino": 3}, "first inode 3"),
    ({"inode_size": 200}, "inode size 200"),
    ({"inode_size": 64}, "inode size 64"),
])
def test_ext_corrupt(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_ext4(ext_sb(**kwargs))


def test_ext_checksum_mismatch() -> None:
    sb = bytearray(ext_sb())
    sb[0x78] ^= 0x20  # the label changes, the checksum does not
    with pytest.raises(ImageError, match="checksum does not match"):
        parse_ext4(bytes(sb))


def test_ext_without_metadata_csum_has_no_checksum_to_check() -> None:
    sb = ext_sb(ro_compat=EXT4_RO_COMPAT & ~0x400, checksum=False)
    assert parse_ext4(sb).label == "Anaconda"


def test_ext_journal_device_is_not_a_filesystem() -> None:
    with pytest.raises(ImageError, match="external ext journal"):
        parse_ext4(ext_sb(incompat=EXT4_INCOMPAT | 0x8))


def test_ext_bad_magic_and_short() -> None:
    with pytest.raises(ImageError, match="no 0xEF53 magic"):
        parse_ext4(bytes(1024))
    with pytest.raises(ImageError, match="too short"):
        parse_ext4(ext_sb()[:1000])


@given(st.binary(min_size=1024, max_size=1024))
def test_ext_garbage_is_one_clear_error(data: bytes) -> None:
    sb = bytearray(data)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    try:
        info = parse_ext4(bytes(sb), size=1 << 40)
    except ImageError as exc:
        assert exc.message
    else:
        assert info.files >= 0


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


# ------------------------------------------------------------------ detection


def _mbr(entries: list[tuple[int, int]]) -> bytearray:
    head = bytearray(4096)
    for i, (boot, kind) in enumerate(entries):
        head[446 + 16 * i] = boot
        head[446 + 16 * i + 4] = kind
    head[510:512] = b"\x55\xaa"
    return head


def test_detect_each_kind() -> None:
    assert detect(squashfs_sb() + bytes(4000)) is Kind.SQUASHFS
    assert detect(bytes(1024) + ext_sb() + bytes(2048)) is Kind.EXT
    gpt = _mbr([(0, 0xEE)])
    gpt[512:520] = b"EFI PART"
    assert detect(bytes(gpt)) is Kind.GPT
    assert detect(bytes(_mbr([(0x80, 0x83), (0, 0x82)]))) is Kind.MBR
    assert detect(bytes(_mbr([]))) is Kind.MBR  # a table with no partitions yet


@pytest.mark.parametrize("head", [
    b"", b"hsq", bytes(4096), b"\x7fELF" + bytes(4092), b"hello world\n" * 300,
])
def test_detect_unknown(head: bytes) -> None:
    assert detect(head) is Kind.UNKNOWN


def test_detect_fat_boot_sector_is_not_a_partition_table() -> None:
    fat = _mbr([])
    fat[0:3] = b"\xeb\x58\x90"
    fat[0x52:0x5A] = b"FAT32   "
    assert detect(bytes(fat)) is Kind.UNKNOWN


def test_detect_bad_boot_flags_is_not_a_partition_table() -> None:
    assert detect(bytes(_mbr([(0x12, 0x83)]))) is Kind.UNKNOWN


def test_detect_ext_with_a_boot_sector_is_ext() -> None:
    head = bytearray(bytes(1024) + ext_sb() + bytes(2048))
    head[510:512] = b"\x55\xaa"  # extlinux writes one into the ext boot block
    assert detect(bytes(head)) is Kind.EXT


@given(st.binary(max_size=4096))
def test_detect_never_fails(head: bytes) -> None:
    assert detect(head) in set(Kind)
