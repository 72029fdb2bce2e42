"""What an image is, read from its first bytes: pure parsers of the squashfs
and ext2/3/4 superblocks and of the partition-table signatures.

Nothing here opens a file or runs a command, so every decision (is it
truncated, is the superblock sane, which features are on) is tested on bytes.
Callers pass the size of the file or partition the bytes came from, which is
how a truncated image is told from a whole one."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from dmoverlay.core.errors import ImageError
from dmoverlay.core.sizes import KiB, MiB, format_size

# ------------------------------------------------------------------ detection

HEAD_SIZE = 4096  # enough for every signature below
EXT_SUPERBLOCK_OFFSET = 1024
EXT_SUPERBLOCK_SIZE = 1024
SECTOR = 512  # parted reads a disk image in a regular file with 512-byte sectors


_CORRUPT_HINT = "the image is damaged: build or copy it again"


class Kind(StrEnum):
    SQUASHFS = "squashfs"
    EXT = "ext"
    GPT = "gpt"
    MBR = "mbr"
    UNKNOWN = "unknown"


SQUASHFS_MAGIC = b"hsqs"
EXT_MAGIC = 0xEF53
GPT_SIGNATURE = b"EFI PART"
MBR_SIGNATURE = b"\x55\xaa"


def detect(head: bytes) -> Kind:
    """What the bytes at the start of a file or partition are.

    The order matters: a squashfs or a GPT signature is too specific to be
    chance, while 0x55AA at byte 510 can also end a FAT or NTFS boot sector
    or a bootloader written into an ext filesystem's boot block."""
    if head[:4] == SQUASHFS_MAGIC:
        return Kind.SQUASHFS
    if head[SECTOR:SECTOR + 8] == GPT_SIGNATURE:
        return Kind.GPT
    if _looks_ext(head):
        return Kind.EXT
    if _looks_mbr(head):
        return Kind.MBR
    return Kind.UNKNOWN


def _looks_ext(head: bytes) -> bool:
    sb = head[EXT_SUPERBLOCK_OFFSET:EXT_SUPERBLOCK_OFFSET + EXT_SUPERBLOCK_SIZE]
    return len(sb) >= 0x1C and _u16(sb, 0x38) == EXT_MAGIC


def _looks_mbr(head: bytes) -> bool:
    if head[510:512] != MBR_SIGNATURE:
        return False
    # A FAT or NTFS volume boot record ends the same way; its BIOS parameter
    # block names the filesystem where a partition table would not.
    if head[3:7] == b"NTFS" or b"FAT" in head[0x36:0x3E] or b"FAT" in head[0x52:0x5A]:
        return False
    return all(head[446 + 16 * i] in (0x00, 0x80) for i in range(4))


# ------------------------------------------------------------------- squashfs

SQUASHFS_SUPERBLOCK_SIZE = 96
_SQUASHFS = struct.Struct("<4sIIIIHHHHHHQQQQQQQQ")
_ABSENT = 0xFFFF_FFFF_FFFF_FFFF  # a table that is not there
_METADATA_BLOCK = 8192

COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}

SQUASHFS_FLAGS = (
    (0x0001, "uncompressed_inodes"),
    (0x0002, "uncompressed_data"),
    (0x0008, "uncompressed_fragments"),
    (0x0010, "no_fragments"),
    (0x0020, "always_fragments"),
    (0x0040, "duplicates"),
    (0x0080, "exportable"),
    (0x0100, "uncompressed_xattrs"),
    (0x0200, "no_xattrs"),
    (0x0400, "compressor_options"),
    (0x0800, "uncompressed_ids"),
)


@dataclass(frozen=True)
class SquashfsInfo:
    version: str
    compression: str
    block_size: int
    inodes: int
    fragments: int
    bytes_used: int
    mkfs_time: int  # seconds since the epoch, UTC
    flags: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "compression": self.compression,
            "block_size": self.block_size,
            "inodes": self.inodes,
            "fragments": self.fragments,
            "bytes_used": self.bytes_used,
            "mkfs_time": iso_time(self.mkfs_time),
            "flags": list(self.flags),
        }


def parse_squashfs(head: bytes, *, size: int | None = None) -> SquashfsInfo:
    """The squashfs 4.0 superblock at the start of `head`.  `size` is the
    length of the file or region holding it, when known."""
    if len(head) < SQUASHFS_SUPERBLOCK_SIZE:
        raise ImageError(f"too short for a squashfs superblock ({len(head)} bytes)",
                         hint="the file is truncated or is not a squashfs")
    (magic, inodes, mkfs_time, block_size, fragments, compression, block_log, flags, _ids,
     major, minor, root_inode, bytes_used, id_table, xattr_table, inode_table,
     directory_table, fragment_table, lookup_table) = _SQUASHFS.unpack_from(head)
    if magic != SQUASHFS_MAGIC:
        raise ImageError("not a squashfs (no 'hsqs' magic)",
                         hint="make it with mksquashfs, or its start is damaged")
    if (major, minor) != (4, 0):
        raise ImageError(f"squashfs version {major}.{minor} is not supported",
                         hint="only squashfs 4.0 (Linux 2.6.29 and later) is read")
    _check_squashfs_geometry(block_size=block_size, block_log=block_log,
                             compression=compression, inodes=inodes)
    _check_squashfs_tables(bytes_used=bytes_used, root_inode=root_inode,
                           inode_table=inode_table, directory_table=directory_table,
                           required=(id_table,),
                           optional=(xattr_table, fragment_table, lookup_table))
    if size is not None and bytes_used > size:
        raise ImageError(
            f"squashfs is truncated: its superblock says {bytes_used} bytes "
            f"({format_size(bytes_used)}) but only {size} are there",
            hint="the copy is incomplete: copy or build the image again")
    return SquashfsInfo(
        version=f"{major}.{minor}",
        compression=COMPRESSORS[compression],
        block_size=block_size,
        inodes=inodes,
        fragments=fragments,
        bytes_used=bytes_used,
        mkfs_time=mkfs_time,
        flags=tuple(name for bit, name in SQUASHFS_FLAGS if flags & bit),
    )


def _check_squashfs_geometry(*, block_size: int, block_log: int, compression: int,
                             inodes: int) -> None:
    if not (4 * KiB <= block_size <= MiB and block_size & (block_size - 1) == 0):
        raise ImageError(f"squashfs superblock is corrupt: block size {block_size} is not "
                         "a power of two from 4 KiB to 1 MiB", hint=_CORRUPT_HINT)
    if 1 << block_log != block_size:
        raise ImageError(f"squashfs superblock is corrupt: block log {block_log} does not "
                         f"match block size {block_size}", hint=_CORRUPT_HINT)
    if compression not in COMPRESSORS:
        raise ImageError(f"squashfs superblock is corrupt: unknown compression id "
                         f"{compression}", hint=_CORRUPT_HINT)
    if inodes == 0:
        raise ImageError("squashfs superblock is corrupt: it counts no inodes",
                         hint=_CORRUPT_HINT)


def _check_squashfs_tables(*, bytes_used: int, root_inode: int, inode_table: int,
                           directory_table: int, required: tuple[int, ...],
                           optional: tuple[int, ...]) -> None:
    """The tables follow the data in this order: inodes, directories, then
    fragments, export, ids and xattrs; all end before `bytes_used`.  The
    kernel refuses a superblock that breaks this, and so do we."""
    problem = None
    if not SQUASHFS_SUPERBLOCK_SIZE <= inode_table < directory_table < bytes_used:
        problem = "its inode and directory tables are out of place"
    elif any(not directory_table <= t < bytes_used for t in required):
        problem = "its id table is out of place"
    elif any(t != _ABSENT and not directory_table <= t < bytes_used for t in optional):
        problem = "a fragment, export or xattr table is out of place"
    elif (root_inode >> 16) >= directory_table - inode_table or (
            root_inode & 0xFFFF) >= _METADATA_BLOCK:
        problem = "its root inode is outside the inode table"
    if problem:
        raise ImageError(f"squashfs superblock is corrupt: {problem}", hint=_CORRUPT_HINT)


# ----------------------------------------------------------------------- ext

# Feature names as e2fsprogs (dumpe2fs) prints them; unknown bits print as
# FEATURE_C12, FEATURE_I31 or FEATURE_R9, the way e2fsprogs does.
COMPAT_FEATURES = {
    0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr",
    0x10: "resize_inode", 0x20: "dir_index", 0x40: "lazy_bg", 0x100: "snapshot_bitmap",
    0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes",
    0x1000: "orphan_file",
}
INCOMPAT_FEATURES = {
    0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev",
    0x10: "meta_bg", 0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg",
    0x400: "ea_inode", 0x1000: "dirdata", 0x2000: "metadata_csum_seed", 0x4000: "large_dir",
    0x8000: "inline_data", 0x10000: "encrypt", 0x20000: "casefold",
}
RO_COMPAT_FEATURES = {
    0x1: "sparse_super", 0x2: "large_file", 0x8: "huge_file", 0x10: "uninit_bg",
    0x20: "dir_nlink", 0x40: "extra_isize", 0x100: "quota", 0x200: "bigalloc",
    0x400: "metadata_csum", 0x800: "replica", 0x1000: "read-only", 0x2000: "project",
    0x4000: "shared_blocks", 0x8000: "verity", 0x10000: "orphan_present",
}
# What ext3 knew; any other feature makes it ext4 (blkid decides the same way).
_EXT3_INCOMPAT = 0x2 | 0x4 | 0x10
_EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4
_HAS_JOURNAL = 0x4
_JOURNAL_DEV = 0x8
_METADATA_CSUM = 0x400
_64BIT = 0x80
_GOOD_OLD_FIRST_INO = 11
_GOOD_OLD_INODE_SIZE = 128
_STATE_CLEAN = 0x1
_STATE_ERRORS = 0x2
_CSUM_CRC32C = 1


@dataclass(frozen=True)
class Ext4Info:
    fs_type: str  # ext2, ext3 or ext4
    label: str
    uuid: str
    block_size: int
    blocks: int
    free_blocks: int
    inodes: int
    free_inodes: int
    first_inode: int  # inodes below it are reserved for the filesystem itself
    # Inodes past first_inode that hold filesystem metadata, not files: the
    # quota files and the orphan file of newer filesystems.
    hidden_inodes: tuple[int, ...]
    inode_size: int
    features: tuple[str, ...]
    state: str  # clean, not clean, errors
    mkfs_time: int | None
    last_mount_time: int | None
    last_write_time: int | None

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    @property
    def free(self) -> int:
        return self.free_blocks * self.block_size

    @property
    def reserved_inodes(self) -> int:
        return self.first_inode - 1 + len(self.hidden_inodes)

    @property
    def files(self) -> int:
        """Inodes in use other than the filesystem's own (inodes 1 to 10:
        root directory, journal, resize inode...; quota and orphan files):
        every file, directory (lost+found included), symlink and device once,
        hard links once.  From the superblock's free count, which mke2fs and
        an unmount keep exact."""
        return max(0, self.inodes - self.free_inodes - self.reserved_inodes)

    def to_dict(self) -> dict[str, object]:
        return {
            "type": self.fs_type,
            "label": self.label,
            "uuid": self.uuid,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "fs_size": self.size,
            "free_blocks": self.free_blocks,
            "free": self.free,
            "inodes": self.inodes,
            "free_inodes": self.free_inodes,
            "reserved_inodes": self.reserved_inodes,
            "files": self.files,
            "inode_size": self.inode_size,
            "features": list(self.features),
            "state": self.state,
            "mkfs_time": iso_time(self.mkfs_time),
            "last_mount_time": iso_time(self.last_mount_time),
            "last_write_time": iso_time(self.last_write_time),
        }


def parse_ext4(sb: bytes, *, size: int | None = None) -> Ext4Info:
    """The ext2/3/4 superblock: the 1024 bytes found 1024 bytes into the
    filesystem.  `size` is the length of the file or partition holding it."""
    if len(sb) < EXT_SUPERBLOCK_SIZE:
        raise ImageError(f"too short for an ext superblock ({len(sb)} bytes)",
                         hint="the file is truncated or is not an ext filesystem")
    if _u16(sb, 0x38) != EXT_MAGIC:
        raise ImageError("not an ext2/3/4 filesystem (no 0xEF53 magic)",
                         hint="make it with mkfs.ext4, or its start is damaged")
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    if incompat & _JOURNAL_DEV:
        raise ImageError("this is an external ext journal, not a filesystem",
                         hint="give the filesystem that uses it instead")
    _check_ext_checksum(sb, ro_compat)
    info = _ext_info(sb, compat, incompat, ro_compat)
    _check_ext_geometry(sb, info)
    if size is not None and info.size > size:
        raise ImageError(
            f"ext filesystem is truncated: its superblock says {info.size} bytes "
            f"({format_size(info.size)}) but only {size} are there",
            hint="the copy is incomplete: copy or build the image again")
    return info


def _ext_info(sb: bytes, compat: int, incompat: int, ro_compat: int) -> Ext4Info:
    log_block = _u32(sb, 0x18)
    if log_block > 6:
        raise ImageError(f"ext superblock is corrupt: block size 2^(10+{log_block})",
                         hint=_CORRUPT_HINT)
    wide = bool(incompat & _64BIT)
    rev = _u32(sb, 0x4C)
    first_inode = _u32(sb, 0x54) if rev >= 1 else _GOOD_OLD_FIRST_INO
    inodes = _u32(sb, 0x0)
    return Ext4Info(
        fs_type=_ext_type(compat, incompat, ro_compat),
        label=sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace"),
        uuid=uuid_text(bytes(sb[0x68:0x78])),
        block_size=1024 << log_block,
        blocks=_u32(sb, 0x4) | (_u32(sb, 0x150) << 32 if wide else 0),
        free_blocks=_u32(sb, 0xC) | (_u32(sb, 0x158) << 32 if wide else 0),
        inodes=inodes,
        free_inodes=_u32(sb, 0x10),
        first_inode=first_inode,
        hidden_inodes=_hidden_inodes(sb, first_inode=first_inode, inodes=inodes),
        inode_size=_u16(sb, 0x58) if rev >= 1 else _GOOD_OLD_INODE_SIZE,
        features=feature_names(compat, incompat, ro_compat),
        state=_ext_state(_u16(sb, 0x3A)),
        mkfs_time=_ext_time(sb, 0x108, 0x276),
        last_mount_time=_ext_time(sb, 0x2C, 0x275),
        last_write_time=_ext_time(sb, 0x30, 0x274),
    )


# Where the superblock names the inodes of the user, group and project quota
# files and of the orphan file.
_METADATA_INODE_FIELDS = (0x240, 0x244, 0x26C, 0x280)


def _hidden_inodes(sb: bytes, *, first_inode: int, inodes: int) -> tuple[int, ...]:
    numbers = {_u32(sb, offset) for offset in _METADATA_INODE_FIELDS}
    return tuple(sorted(n for n in numbers if first_inode <= n <= inodes))


def _check_ext_geometry(sb: bytes, info: Ext4Info) -> None:
    rev = _u32(sb, 0x4C)
    problem = None
    if rev > 1:
        problem = f"unknown revision {rev}"
    elif info.blocks == 0 or info.inodes == 0:
        problem = "it counts no blocks or no inodes"
    elif info.free_blocks > info.blocks or info.free_inodes > info.inodes:
        problem = "it has more free blocks or inodes than it has"
    elif _u32(sb, 0x20) == 0 or _u32(sb, 0x28) == 0:
        problem = "it has no blocks or inodes per group"
    elif not _GOOD_OLD_FIRST_INO <= info.first_inode <= info.inodes:
        problem = f"first inode {info.first_inode} is out of range"
    elif (info.inode_size < _GOOD_OLD_INODE_SIZE or info.inode_size > info.block_size
          or info.inode_size & (info.inode_size - 1)):
        problem = f"inode size {info.inode_size} is impossible"
    if problem:
        raise ImageError(f"ext superblock is corrupt: {problem}", hint=_CORRUPT_HINT)


def _check_ext_checksum(sb: bytes, ro_compat: int) -> None:
    """With metadata_csum the superblock carries a crc32c of itself: the one
    check that catches damage anywhere in it."""
    if not ro_compat & _METADATA_CSUM:
        return
    if sb[0x175] != _CSUM_CRC32C:
        raise ImageError(f"ext superblock is corrupt: unknown checksum type {sb[0x175]}",
                         hint=_CORRUPT_HINT)
    # ext4 stores the raw CRC (seeded with ~0, not inverted at the end).
    expected = crc32c(sb[:0x3FC]) ^ 0xFFFFFFFF
    if _u32(sb, 0x3FC) != expected:
        raise ImageError("ext superblock is corrupt: its checksum does not match",
                         hint=_CORRUPT_HINT)


def _ext_type(compat: int, incompat: int, ro_compat: int) -> str:
    if incompat & ~_EXT3_INCOMPAT or ro_compat & ~_EXT3_RO_COMPAT:
        return "ext4"
    return "ext3" if compat & _HAS_JOURNAL else "ext2"


def _ext_state(state: int) -> str:
    if state & _STATE_ERRORS:
        return "errors"
    return "clean" if state & _STATE_CLEAN else "not clean"


def _ext_time(sb: bytes, low: int, high: int) -> int | None:
    """A superblock time: 32 bits plus 8 more bits (years past 2106) in a
    separate byte; 0 means never."""
    seconds = _u32(sb, low) | (sb[high] << 32)
    return seconds or None


def feature_names(compat: int, incompat: int, ro_compat: int) -> tuple[str, ...]:
    """Feature names in dumpe2fs's order: compat, incompat, then ro_compat."""
    names: list[str] = []
    for mask, table, letter in ((compat, COMPAT_FEATURES, "C"),
                                (incompat, INCOMPAT_FEATURES, "I"),
                                (ro_compat, RO_COMPAT_FEATURES, "R")):
        for bit in range(32):
            if mask & (1 << bit):
                names.append(table.get(1 << bit, f"FEATURE_{letter}{bit}"))
    return tuple(names)


# -------------------------------------------------------------------- helpers


def _u16(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<H", data, offset)[0]
    return value


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def iso_time(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    from datetime import UTC, datetime  # here: every update is identified, few inspected

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as iSCSI and ext4 use it; the standard form
    (crc32c(b"123456789") == 0xE3069283)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def uuid_text(raw: bytes) -> str:
    """16 bytes as the 8-4-4-4-12 hex form blkid prints."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
