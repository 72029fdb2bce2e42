"""Which base a persistent overlay's store belongs to, decided without
touching the kernel.

A store holds chunks of one exact base: over another one (a new
squashfs.img on the same stick, a rebuilt image) its chunks patch blocks
that now hold something else, and the filesystem is silently corrupt.
dm-snapshot's format has no room for this, but its first chunk does: the
kernel reads the 16-byte header from it and nothing else, and writes the
whole chunk only when it writes a header (a new store, or one it gives up
on).  The record lives there, from byte 512 on, out of the header's sector:

    offset  size
    0       8     magic "DMOVBASE"
    8       4     version (1), little-endian like the store's header
    12      4     length of what follows up to the digest (84)
    16      16    the base's ext4 UUID
    32      8     the base's size in sectors
    40      32    SHA-256 of the base's first 64 KiB and its size
    72      16    the base's ext4 label, NUL-padded
    88      12    zero
    100     32    SHA-256 of bytes 0..100: a damaged record is not taken

The base's first 64 KiB hold its superblock (UUID, label, block and inode
counts, free counts, its checksum) and the group descriptors after it:
reading them costs one small read at boot, and a rebuilt image differs
there (`build` even derives the UUID from the tree).  What it cannot tell
apart: two images with the same UUID and the same allocation whose files
differ only in content of the same size (e.g. rebuilt with a fixed --uuid
and one file edited in place)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from dmoverlay.core.errors import DmoverlayError, ImageError, OverlayError
from dmoverlay.core.sizes import KiB, format_size
from dmoverlay.core.superblock import parse_ext4, uuid_text
from dmoverlay.overlay.dmtable import CHUNK_SECTORS
from dmoverlay.overlay.persistent import STORE_MAGIC, STORE_VERSION

HEAD_BYTES = 64 * KiB  # of the base, digested
RECORD_OFFSET = 512  # in the store's first chunk: out of the header's sector
MAGIC = b"DMOVBASE"
VERSION = 1
_BODY = struct.Struct("<16sQ32s16s12x")
_TOP = struct.Struct("<8sII")
RECORD_SIZE = _TOP.size + _BODY.size + 32
_SECTOR = 512
_RESET = "--overlay-reset (rd.live.overlay.reset) starts it afresh: what it holds is lost"


@dataclass(frozen=True)
class BaseIdentity:
    """A base as a store records it: its ext4 UUID and label, its size in
    sectors, and the digest of its first 64 KiB and size."""

    uuid: str
    label: str
    sectors: int
    digest: bytes

    @property
    def key(self) -> tuple[str, int, bytes]:
        """What tells bases apart (the label is for people; the digest covers it)."""
        return self.uuid, self.sectors, self.digest

    def describe(self) -> str:
        label = f"label {self.label!r}, " if self.label else ""
        return f"ext4 UUID {self.uuid} ({label}{format_size(self.sectors * _SECTOR)})"


def identify(head: bytes, sectors: int, *, where: str) -> BaseIdentity:
    """The identity of the base whose first bytes are `head` (at least its
    first 64 KiB, unless it is smaller) and whose size is `sectors`."""
    import hashlib  # here: setup without a persistent overlay never needs it

    head = head[:HEAD_BYTES]
    try:
        info = parse_ext4(head[1024:2048], size=sectors * _SECTOR)
    except DmoverlayError as exc:
        raise ImageError(f"{where}: {exc.message}", hint="the image is damaged") from None
    digest = hashlib.sha256(head + struct.pack("<Q", sectors)).digest()
    return BaseIdentity(info.uuid, info.label, sectors, digest)


def encode(identity: BaseIdentity) -> bytes:
    """The record of `identity`, as it is written at RECORD_OFFSET."""
    import hashlib

    label = identity.label.encode("utf-8", "replace")[:16]
    body = _BODY.pack(bytes.fromhex(identity.uuid.replace("-", "")), identity.sectors,
                      identity.digest, label)
    top = _TOP.pack(MAGIC, VERSION, _BODY.size) + body
    return top + hashlib.sha256(top).digest()


def decode(chunk: bytes, *, where: str) -> BaseIdentity | None:
    """The base recorded in a store's first chunk (its bytes from 0 on, at
    least RECORD_OFFSET + RECORD_SIZE of them), or None when none was: the
    bytes are zero, as the kernel leaves them (a store dracut made, or one
    made before records).  Anything else there is refused: neither the
    kernel nor dmoverlay writes it."""
    import hashlib

    raw = chunk[RECORD_OFFSET:RECORD_OFFSET + RECORD_SIZE]
    if len(raw) < RECORD_SIZE:
        raise ImageError(f"{where}: too short to hold a snapshot store")
    if not raw.strip(b"\0"):
        return None
    magic, version, length = _TOP.unpack_from(raw)
    damaged = f"{where}: the record of the base this overlay belongs to is damaged"
    if magic != MAGIC:
        raise ImageError(f"{damaged} (unknown bytes after the store's header)", hint=_RESET)
    if version != VERSION or length != _BODY.size:
        raise ImageError(f"{where}: the record of the base this overlay belongs to is of "
                         f"version {version}, unknown to this dmoverlay",
                         hint=f"use the dmoverlay that made it; or {_RESET}")
    end = _TOP.size + _BODY.size
    if hashlib.sha256(raw[:end]).digest() != raw[end:]:
        raise ImageError(f"{damaged} (its checksum does not match)", hint=_RESET)
    raw_uuid, sectors, digest, label = _BODY.unpack_from(raw, _TOP.size)
    return BaseIdentity(uuid_text(raw_uuid),
                        label.rstrip(b"\0").decode("utf-8", "replace"), sectors, digest)


# While `dmoverlay merge` folds a store into its base, the base changes
# under its own record (its first 64 KiB are merged too): the merge writes
# this beside the record first, the base's identity as the merge began,
# and a new store header (which clears it) once it is done.  A store that
# holds it is half merged: merge goes on with it over a base of the same
# UUID and size; setup refuses it.
MERGING_OFFSET = 1024
MERGING_MAGIC = b"DMOVMERG"


def merging_fits(chunk_bytes: int) -> bool:
    """Whether a store's first chunk has room for it (4 KiB chunks do)."""
    return chunk_bytes >= MERGING_OFFSET + len(MERGING_MAGIC) + RECORD_SIZE


def encode_merging(identity: BaseIdentity) -> bytes:
    return MERGING_MAGIC + encode(identity)


def decode_merging(chunk: bytes, *, where: str) -> BaseIdentity | None:
    """The base a merge began with, if a merge of this store was begun and
    not finished (None: none was); ImageError for damage.  `chunk`: the
    store's first chunk, no more (past it lies its exception table)."""
    if not merging_fits(len(chunk)):
        return None  # merge never writes it into so small a chunk
    raw = chunk[MERGING_OFFSET:MERGING_OFFSET + len(MERGING_MAGIC) + RECORD_SIZE]
    if not raw.strip(b"\0"):
        return None
    if raw[:len(MERGING_MAGIC)] != MERGING_MAGIC:
        raise ImageError(f"{where}: unknown bytes after the record of its base", hint=_RESET)
    padded = bytes(RECORD_OFFSET) + raw[len(MERGING_MAGIC):]
    return decode(padded, where=where)


class Verdict(StrEnum):
    SAME = "same"  # recorded, and this is the base
    UNRECORDED = "unrecorded"  # no record: a store dracut made; record it now


def judge(recorded: BaseIdentity | None, base: BaseIdentity, *, where: str) -> Verdict:
    """Whether a store that recorded `recorded` may be used over `base`;
    OverlayError, before anything is attached, when it belongs to another."""
    if recorded is None:
        return Verdict.UNRECORDED
    if recorded.key == base.key:
        return Verdict.SAME
    if recorded.uuid == base.uuid:
        other = (f"a base of the same UUID {base.uuid} but other content "
                 f"({_differs(recorded, base)}): the image was rebuilt")
    else:
        other = f"another base: {recorded.describe()}, not this image's {base.describe()}"
    raise OverlayError(f"{where}: this overlay was made over {other}; its changes would "
                       "corrupt this one",
                       hint="boot the image it was made over and fold the changes in first "
                            "(dmoverlay build --from-live, or dmoverlay merge), or "
                            + _RESET)


def _differs(recorded: BaseIdentity, base: BaseIdentity) -> str:
    if recorded.sectors != base.sectors:
        return f"{format_size(recorded.sectors * _SECTOR)}, now " \
               f"{format_size(base.sectors * _SECTOR)}"
    if recorded.label != base.label:
        return f"label {recorded.label!r}, now {base.label!r}"
    return "its superblock and group descriptors differ"


def new_store(identity: BaseIdentity, chunk_sectors: int = CHUNK_SECTORS) -> bytes:
    """The first two chunks of a new store that records `identity`: the
    header (valid), the record, and a first exception area of zeros, which
    the kernel reads as a store that holds nothing yet."""
    chunk = chunk_sectors * _SECTOR
    if chunk < RECORD_OFFSET + RECORD_SIZE:
        raise ValueError(f"a chunk of {chunk_sectors} sectors holds no record")
    header = struct.pack("<4sIII", STORE_MAGIC, 1, STORE_VERSION, chunk_sectors)
    first = header.ljust(RECORD_OFFSET, b"\0") + encode(identity)
    return first.ljust(chunk, b"\0") + bytes(chunk)


def has_room(chunk_sectors: int) -> bool:
    """Whether a store's first chunk can hold the record (not in a
    one-sector chunk, where the header is all there is)."""
    return chunk_sectors * _SECTOR >= RECORD_OFFSET + RECORD_SIZE
