"""What an update file is: its format and compression, from its content,
never its name (a directory needs no telling)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from dmoverlay.apply.readers import cpio
from dmoverlay.core import superblock
from dmoverlay.core.compress import STREAM_ERRORS, Compression, Readable, open_decompressed
from dmoverlay.core.compress import detect as detect_compression
from dmoverlay.core.errors import NotRegular, SourceError
from dmoverlay.core.tarread import open_regular, tar_header_checksum_ok

HEAD_SIZE = superblock.HEAD_SIZE

ACCEPTED = ("give a directory; a cpio (newc, crc, odc) or tar archive, plain or compressed "
            "with gzip, xz, bzip2 or zstd; an uncompressed squashfs or ext2/3/4 image; "
            "or an http(s) URL of one of these")
_DAMAGED = "the update is damaged or truncated: download or re-create it"


class Format(StrEnum):
    TAR = "tar"
    CPIO = "cpio"
    SQUASHFS = "squashfs"
    EXT = "ext"


# ------------------------------------------------------------------ detection


def identify(head: bytes) -> Format | None:
    """What uncompressed content starting with `head` is (4 KiB suffice).

    Archives first: their magics sit where an image's boot block is zero;
    the old tar header checksum, the weakest sign, last."""
    if head[:6] in (b"070701", b"070702", b"070707"):
        return Format.CPIO
    if len(head) >= 512 and head[257:262] == b"ustar":
        return Format.TAR
    if cpio.detect(head) is not None:
        return Format.CPIO
    kind = superblock.detect(head)
    if kind is superblock.Kind.SQUASHFS:
        return Format.SQUASHFS
    if kind is superblock.Kind.EXT:
        return Format.EXT
    if len(head) >= 512 and tar_header_checksum_ok(head):
        return Format.TAR
    return None


def not_an_update(label: str, what: str) -> SourceError:
    return SourceError(f"not an update: {label} ({what})", hint=ACCEPTED)


def identify_file(path: Path, label: str) -> tuple[Format, Compression]:
    with open_file(path, label) as raw:
        head = raw.read(HEAD_SIZE)
        if not head:
            raise not_an_update(label, "empty file")
        compression = detect_compression(head)
        if compression is Compression.NONE:
            plain = head
        else:
            raw.seek(0)
            plain = _decompressed_head(raw, label, compression)
        found = identify(plain)
        if found is None and compression is not Compression.NONE:
            # A damaged stream can decompress to garbage before its check
            # fails (bzip2 checks each 900 KiB block at its end): say so.
            raw.seek(0)
            _check_stream(raw, label, compression)
    if found is None:
        kind = superblock.detect(plain)
        what = (f"a {kind} disk image" if kind in (superblock.Kind.GPT, superblock.Kind.MBR)
                else "empty after decompression" if not plain
                else "content not recognised")
        raise not_an_update(label, what if compression is Compression.NONE
                             else f"{compression}-compressed, {what}")
    if compression is not Compression.NONE and found in (Format.SQUASHFS, Format.EXT):
        raise SourceError(f"{label}: a {compression}-compressed {found} image",
                          hint="decompress it first: images are mounted, which needs "
                               "them uncompressed")
    return found, compression


def _decompressed_head(raw: BinaryIO, label: str, compression: Compression) -> bytes:
    with _damage_reported(label, compression), open_decompressed(label, raw) as stream:
        return _read_up_to(stream, HEAD_SIZE)


def _check_stream(raw: BinaryIO, label: str, compression: Compression) -> None:
    with _damage_reported(label, compression), open_decompressed(label, raw) as stream:
        stream.drain()


@contextmanager
def _damage_reported(label: str, compression: Compression) -> Iterator[None]:
    try:
        yield
    except STREAM_ERRORS as exc:
        raise SourceError(f"{label}: corrupt {compression} data ({exc})",
                          hint=_DAMAGED) from None


def _read_up_to(stream: Readable, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size and (chunk := stream.read(size - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def open_file(path: Path, label: str) -> BinaryIO:
    """An update file opened for reading (tarread.open_regular), its
    refusal worded for an update."""
    try:
        return open_regular(path, label)
    except NotRegular:
        raise not_an_update(label, "not a regular file or directory") from None
