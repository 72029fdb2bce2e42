"""The common tar header, read without Python's tarfile.

Nearly every header of an update is one 512-byte ustar or GNU block with
octal numbers, a short name and no extension.  tarfile spends about 20 us
on each (it decodes every field, both checksums, then builds a TarInfo);
reading the fields a Member needs takes a fraction of that.

Anything else, or anything in doubt, is left to tarfile: `plain_header`
answers None, and the caller hands that header to tarfile, whose reading is
the reference (tests compare the two on generated and damaged archives)."""

from __future__ import annotations

import stat
import sys
import zlib

from dmoverlay.cpio import member_name
from dmoverlay.members import Kind, Member

BLOCK = 512
_ENCODING, _ERRORS = sys.getfilesystemencoding(), "surrogateescape"  # as tarfile's
_KINDS = {
    b"0"[0]: Kind.FILE, 0: Kind.FILE, b"7"[0]: Kind.FILE,  # contiguous: a file
    b"1"[0]: Kind.HARDLINK, b"2"[0]: Kind.SYMLINK, b"3"[0]: Kind.CHAR,
    b"4"[0]: Kind.BLOCK, b"5"[0]: Kind.DIR, b"6"[0]: Kind.FIFO,
}


def _text(field: bytes) -> str:
    return field.partition(b"\0")[0].decode(_ENCODING, _ERRORS)


def octal(field: bytes) -> int:
    """An octal number as tarfile reads it (ValueError if not one: a
    base-256 number, say, which tarfile reads itself)."""
    return int(field.partition(b"\0")[0].strip() or b"0", 8)


def _sum(data: bytes) -> int:
    """The sum of at most 256 bytes: adler32's first half is 1 + that sum,
    modulo 65521, which 256 * 255 does not reach."""
    return (zlib.adler32(data) & 0xFFFF) - 1


def checksum(buf: bytes) -> int:
    """The header's unsigned checksum: every byte, the checksum field
    counted as eight spaces."""
    return _sum(buf[:148]) + 8 * 32 + _sum(buf[156:412]) + _sum(buf[412:BLOCK])


def plain_header(buf: bytes) -> Member | None:
    """The Member a plain ustar or GNU header describes, or None if the
    header is anything else (an extension, a name prefix, a base-256
    number, a bad or signed checksum, an end-of-archive block, ...)."""
    if len(buf) < BLOCK or buf[257:262] != b"ustar" or buf[345]:
        return None
    kind = _KINDS.get(buf[156])
    if kind is None:
        return None
    try:
        if octal(buf[148:156]) != checksum(buf):
            return None
        mode, uid, gid = octal(buf[100:108]), octal(buf[108:116]), octal(buf[116:124])
        size, mtime = octal(buf[124:136]), octal(buf[136:148])
        rdev = octal(buf[329:337]), octal(buf[337:345])  # read (checked) as tarfile does
    except ValueError:
        return None
    name = _text(buf[:100])
    if kind is Kind.FILE and buf[156] == 0 and name.endswith("/"):
        kind = Kind.DIR  # v7's way to say directory
    if kind is Kind.DIR:
        name = name.rstrip("/")
    target = ""
    if kind is Kind.SYMLINK:
        target = _text(buf[157:257])
    elif kind is Kind.HARDLINK:
        target = member_name(_text(buf[157:257]))
    return Member(name=member_name(name), kind=kind, mode=stat.S_IMODE(mode), uid=uid,
                  gid=gid, mtime_ns=mtime * 1_000_000_000,
                  size=size if kind is Kind.FILE else 0, target=target,
                  rdev=rdev if kind is Kind.CHAR or kind is Kind.BLOCK else (0, 0))


def data_blocks(size: int) -> int:
    """Bytes a member's data takes in the archive."""
    return -(-size // BLOCK) * BLOCK
