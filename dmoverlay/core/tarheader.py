"""The common tar header, read without Python's tarfile.

Nearly every header of an update is one 512-byte ustar or GNU block with
octal numbers, a short name and no extension.  tarfile spends about 20 us
on each (it decodes every field, both checksums, then builds a TarInfo);
reading the fields a Member needs takes a fraction of that.

Anything else, or anything in doubt, is left to tarfile: `plain_header`
answers None, and the caller hands that header to tarfile, whose reading is
the reference (tests compare the two on generated and damaged archives)."""

from __future__ import annotations

import re
import stat
import sys
import zlib

from dmoverlay.core.entries import Kind, Member, member_name

BLOCK = 512
MAX_MAJOR, MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1  # Linux's dev_t
MAX_SECONDS = 2**34 - 2**31 - 1  # ext4's last second (2446)
_ENCODING, _ERRORS = sys.getfilesystemencoding(), "surrogateescape"  # as tarfile's
TYPEFLAGS = {  # a tar header's type flag: the one table of both tar readers
    b"0": Kind.FILE, b"\0": Kind.FILE, b"7": Kind.FILE,  # 7, contiguous: a file
    b"1": Kind.HARDLINK, b"2": Kind.SYMLINK, b"3": Kind.CHAR,
    b"4": Kind.BLOCK, b"5": Kind.DIR, b"6": Kind.FIFO,
}


def _text(field: bytes) -> str:
    return field.partition(b"\0")[0].decode(_ENCODING, _ERRORS)


def octal(field: bytes) -> int:
    """An octal number as tarfile reads it (ValueError if not one: a
    base-256 number, say, which tarfile reads itself)."""
    return int(field.partition(b"\0")[0].strip() or b"0", 8)


# the numbers as tar programs write them: fixed-width octal, a NUL after each
# (a NUL and a space after the checksum)
_CANONICAL = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0"
                        rb"([0-7]{6})\0 ")
_NO_DEVICE = (bytes(16), b"0000000\0" * 2)  # devmajor and devminor of an ordinary entry


def _numbers(buf: bytes) -> tuple[int, ...]:
    """mode, uid, gid, size, mtime and checksum: from their usual form in one
    match, else each as tarfile reads it."""
    canonical = _CANONICAL.match(buf, 100)
    if canonical is not None:
        return tuple(int(group, 8) for group in canonical.groups())
    return tuple(octal(buf[a:b]) for a, b in ((100, 108), (108, 116), (116, 124), (124, 136),
                                              (136, 148), (148, 156)))


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
    kind = TYPEFLAGS.get(buf[156:157])
    if kind is None:
        return None
    try:
        mode, uid, gid, size, mtime, chksum = _numbers(buf)
        devs = buf[329:345]
        rdev = (0, 0) if devs in _NO_DEVICE else (octal(devs[:8]), octal(devs[8:]))
    except ValueError:
        return None
    if rdev[0] > MAX_MAJOR or rdev[1] > MAX_MINOR or mtime > MAX_SECONDS:
        return None  # tarfile's reading refuses it, with the other checks
    if chksum != checksum(buf):
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
