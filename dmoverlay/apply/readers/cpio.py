"""cpio archives read as a stream, without the cpio tool: newc ("070701"),
crc ("070702"), odc ("070707") and old binary, in either byte order.

Two layers.  `read_entries` parses headers, names and data and checks what
the format lets us check (magic, digits, sizes, alignment, the crc sum, the
trailer).  `read_members` turns entries into `Member`s, which for hardlinks
means reordering: GNU cpio writes a hardlinked file in newc/crc as size-0
entries followed by one entry that carries the data, and a HARDLINK member
must come after the FILE it names.  `CpioReader` reads an archive file,
plain or compressed, that way."""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from dmoverlay.core.compress import Readable
from dmoverlay.core.entries import Kind, Member, kind_of, member_name
from dmoverlay.core.errors import SourceError
from dmoverlay.core.sizes import KiB
from dmoverlay.core.tarread import ArchiveFile

TRAILER = "TRAILER!!!"
NAME_SIZE_MAX = 4096 + 1  # PATH_MAX and the NUL that ends the name
SYMLINK_MAX = 4096
CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap
READ_AHEAD = 64 * KiB

_CORRUPT_HINT = "the archive is damaged or truncated: download or re-create it"


class Format(StrEnum):
    NEWC = "newc"
    CRC = "crc"
    ODC = "odc"
    BINARY = "bin"


_ASCII_MAGIC = {b"070701": Format.NEWC, b"070702": Format.CRC, b"070707": Format.ODC}
_BINARY_MAGIC = 0o070707
_BINARY = {b"\xc7\x71": "<", b"\x71\xc7": ">"}  # the magic's bytes give the byte order

_NEWC_SIZE = 110
_NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
                "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
_ODC_SIZE = 76
_ODC_FIELDS = (("dev", 6), ("ino", 6), ("mode", 6), ("uid", 6), ("gid", 6), ("nlink", 6),
               ("rdev", 6), ("mtime", 11), ("namesize", 6), ("filesize", 11))
_BINARY_SIZE = 26

_HEX = b"0123456789abcdefABCDEF"
_OCTAL = b"01234567"
_NEWC_LAYOUT = tuple((f, 8) for f in _NEWC_FIELDS)

# Entry data and the header that follows start at multiples of this.
_ALIGN = {Format.NEWC: 4, Format.CRC: 4, Format.ODC: 1, Format.BINARY: 2}


def detect(head: bytes) -> Format | None:
    """The format of an archive starting with `head` (at least 6 bytes)."""
    if head[:6] in _ASCII_MAGIC:
        return _ASCII_MAGIC[head[:6]]
    if head[:2] in _BINARY:
        return Format.BINARY
    return None


@dataclass(frozen=True)
class Header:
    format: Format
    offset: int  # of the header, in the uncompressed stream
    name: str
    ino: int
    mode: int  # file type bits included
    uid: int
    gid: int
    nlink: int
    mtime: int
    filesize: int
    dev: tuple[int, int]
    rdev: tuple[int, int]
    checksum: int = 0

    @property
    def where(self) -> str:
        return f"{self.name!r} (entry at offset {self.offset})"


def split_dev(dev: int) -> tuple[int, int]:
    """Major and minor of a device number in Linux's encoding (odc keeps one
    number, as `makedev` made it on the writing system)."""
    major = ((dev >> 8) & 0xFFF) | ((dev >> 32) & 0xFFFF_F000)
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFFF_FF00)
    return major, minor


# ---------------------------------------------------------------- raw entries


class _Input:
    """The archive's bytes, with the offset of the next one and a way to put
    back what was read too far (looking past a trailer).  Small reads (an
    archive of small files is mostly headers, names and padding) come from a
    block read ahead: each read of the stream passes through several layers
    (decompressor, checks), too slow to take a name or a header at a time."""

    def __init__(self, stream: Readable, where: str) -> None:
        self.stream = stream
        self.where = where
        self.offset = 0
        self._ahead = b""  # read from the stream; not consumed from _pos on
        self._pos = 0

    def error(self, message: str, *, at: int | None = None) -> SourceError:
        offset = self.offset if at is None else at
        return SourceError(f"{self.where}: {message} at offset {offset}", hint=_CORRUPT_HINT)

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; fewer only at the end of the stream."""
        pos, end = self._pos, self._pos + size
        if end <= len(self._ahead):
            self._pos = end
            self.offset += size
            return self._ahead[pos:end]
        parts = [self._ahead[pos:]]
        got = len(parts[0])
        self._ahead, self._pos = b"", 0
        while got < size:
            want = size - got  # large: straight from the stream, not through _ahead
            chunk = self.stream.read(max(want, READ_AHEAD))
            if not chunk:
                break
            if len(chunk) > want:
                self._ahead, self._pos = chunk, want
                chunk = chunk[:want]
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def exact(self, size: int, what: str) -> bytes:
        start = self.offset
        data = self.read(size)
        if len(data) != size:
            raise self.error(f"truncated {what} ({len(data)} of {size} bytes)", at=start)
        return data

    def unread(self, data: bytes) -> None:
        n = len(data)
        if n <= self._pos and self._ahead[self._pos - n:self._pos] == data:
            self._pos -= n  # what was just read from _ahead: no copy
        else:
            self._ahead, self._pos = data + self._ahead[self._pos:], 0
        self.offset -= n

    def skip_padding(self, align: int, what: str) -> None:
        pad = -self.offset % align
        if pad:
            self.exact(pad, what)

    def skip_zeros(self) -> bool:
        """Skip zero bytes; False at the end of the stream."""
        while True:
            chunk = self.read(CHUNK)
            if not chunk:
                return False
            rest = chunk.lstrip(b"\0")
            if rest:
                self.unread(rest)
                return True


class EntryData:
    """The data of one entry: exactly `filesize` bytes.  A crc archive's sum
    is checked when the last byte has been read."""

    def __init__(self, source: _Input, header: Header) -> None:
        self.source = source
        self.header = header
        self.remaining = header.filesize
        self.check = header.format is Format.CRC and stat.S_ISREG(header.mode)
        self.sum = 0
        if self.remaining == 0:
            self._verify()

    def read(self, size: int = -1, /) -> bytes:
        if self.remaining == 0:
            return b""
        n = self.remaining if size < 0 else min(size, self.remaining)
        data = self.source.exact(n, f"data of {self.header.name!r}")
        self.remaining -= n
        if self.check:
            self.sum = (self.sum + sum(data)) & 0xFFFF_FFFF
            if self.remaining == 0:
                self._verify()
        return data

    def _verify(self) -> None:
        if self.check and self.sum != self.header.checksum:
            raise SourceError(
                f"{self.source.where}: {self.header.where}: checksum mismatch "
                f"(sum of the data {self.sum:#010x}, header says "
                f"{self.header.checksum:#010x})", hint=_CORRUPT_HINT)

    def skip(self) -> None:
        while self.read(CHUNK):
            pass


def read_entries(stream: Readable, *, where: str) -> Iterator[tuple[Header, EntryData]]:
    """Every entry of the archive, trailers included, with its data, which is
    skipped if the caller did not read it.  The stream is read to its end:
    after a trailer only zeros (block padding) or a further archive (as in
    an initramfs made of several) may follow."""
    source = _Input(stream, where)
    while True:
        header = _read_header(source)
        data = EntryData(source, header)
        yield header, data
        data.skip()
        source.skip_padding(_ALIGN[header.format], f"padding after {header.name!r}")
        if header.name == TRAILER and not _another_archive(source):
            return


def _another_archive(source: _Input) -> bool:
    if not source.skip_zeros():
        return False
    head = source.read(6)
    source.unread(head)
    if detect(head) is None:
        raise source.error("data after the archive's trailer that is not a further "
                           "cpio archive")
    return True


def _read_header(source: _Input) -> Header:
    offset = source.offset
    magic = source.read(6)
    if not magic:
        raise source.error(f"truncated archive: no {TRAILER} entry before the end")
    fmt = detect(magic)
    if fmt is None and len(magic) < 6:
        raise source.error(f"truncated header ({len(magic)} bytes)", at=offset)
    if fmt is None:
        raise source.error(f"not a cpio header (magic {magic!r})", at=offset)
    if fmt is Format.BINARY:
        source.unread(magic)
        return _binary_header(source, offset)
    if fmt is Format.ODC:
        raw = source.exact(_ODC_SIZE - 6, "header")
        fields = _numbers(source, raw, _ODC_FIELDS, 8, offset)
        return _with_name(source, fmt, offset, fields, dev=split_dev(fields["dev"]),
                          rdev=split_dev(fields["rdev"]))
    raw = source.exact(_NEWC_SIZE - 6, "header")
    fields = _numbers(source, raw, _NEWC_LAYOUT, 16, offset)
    return _with_name(source, fmt, offset, fields,
                      dev=(fields["devmajor"], fields["devminor"]),
                      rdev=(fields["rdevmajor"], fields["rdevminor"]),
                      checksum=fields["check"])


def _numbers(source: _Input, raw: bytes, layout: tuple[tuple[str, int], ...], base: int,
             offset: int) -> dict[str, int]:
    """The numbers of a header (`layout`: each field's name and width)."""
    digits = _HEX if base == 16 else _OCTAL
    fields: dict[str, int] = {}
    pos = 0
    for name, width in layout:
        text = raw[pos:pos + width]
        if text.translate(None, digits):
            kind = "hexadecimal" if base == 16 else "octal"
            raise source.error(f"header field {name} is not {kind} ({text!r})", at=offset)
        fields[name] = int(text, base)
        pos += width
    return fields


def _binary_header(source: _Input, offset: int) -> Header:
    raw = source.exact(_BINARY_SIZE, "header")
    order = _BINARY[raw[:2]]
    (magic, dev, ino, mode, uid, gid, nlink, rdev, mtime_hi, mtime_lo, namesize,
     size_hi, size_lo) = struct.unpack(f"{order}13H", raw)
    assert magic == _BINARY_MAGIC
    fields = {"ino": ino, "mode": mode, "uid": uid, "gid": gid, "nlink": nlink,
              "mtime": mtime_hi << 16 | mtime_lo, "namesize": namesize,
              "filesize": size_hi << 16 | size_lo}
    return _with_name(source, Format.BINARY, offset, fields, dev=(dev >> 8, dev & 0xFF),
                      rdev=(rdev >> 8, rdev & 0xFF))


def _with_name(source: _Input, fmt: Format, offset: int, fields: dict[str, int], *,
               dev: tuple[int, int], rdev: tuple[int, int], checksum: int = 0) -> Header:
    size = fields["namesize"]
    if size == 0 or size > NAME_SIZE_MAX:
        raise source.error(f"impossible name size {size}", at=offset)
    raw = source.exact(size, "name")
    if raw[-1] != 0:
        raise source.error("name not ended by a NUL byte", at=offset)
    if 0 in raw[:-1]:
        raise source.error("name holds a NUL byte", at=offset)
    source.skip_padding(_ALIGN[fmt], "name padding")
    return Header(
        format=fmt, offset=offset, name=os.fsdecode(raw[:-1]), ino=fields["ino"],
        mode=fields["mode"], uid=fields["uid"], gid=fields["gid"], nlink=fields["nlink"],
        mtime=fields["mtime"], filesize=fields["filesize"], dev=dev, rdev=rdev,
        checksum=checksum,
    )


# -------------------------------------------------------------------- members

def _member(header: Header, where: str) -> Member:
    kind = kind_of(header.mode)
    if kind is None:
        raise SourceError(f"{where}: {header.where}: unknown file type "
                          f"{stat.S_IFMT(header.mode):#o}", hint=_CORRUPT_HINT)
    return Member(
        name=member_name(header.name),
        kind=kind,
        mode=stat.S_IMODE(header.mode),
        uid=header.uid,
        gid=header.gid,
        mtime_ns=header.mtime * 1_000_000_000,
        size=header.filesize if kind is Kind.FILE else 0,
        rdev=header.rdev if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0),
    )


# Entries of one inode agree on all of these.  odc keeps only 18 bits of the
# inode number, so the other fields guard against two files that merely share
# those bits; odc and binary archives also repeat the data with every name.
_InodeKey = tuple[Format, tuple[int, int], int, int, int, int, int, int, int]


def _inode_key(h: Header) -> _InodeKey:
    size = h.filesize if h.format in (Format.ODC, Format.BINARY) else -1
    return (h.format, h.dev, h.ino, h.mode, h.uid, h.gid, h.nlink, h.mtime, size)


class _Links:
    """Hardlinked files of one archive (inode numbers are per archive)."""

    def __init__(self) -> None:
        self.carriers: dict[_InodeKey, str] = {}  # inode -> the FILE member's name
        self.waiting: dict[_InodeKey, list[Member]] = {}  # names seen before the data

    def unclaimed(self) -> Iterator[Member]:
        """At the trailer: groups whose data never came.  GNU cpio writes the
        data with the last name, and an empty file has none, so these are
        empty files (GNU cpio extracts them so); the last name is the FILE."""
        for group in self.waiting.values():
            *links, last = group
            yield last
            for link in links:
                yield _link(link, last.name)
        self.waiting.clear()


def _link(member: Member, target: str) -> Member:
    return replace(member, kind=Kind.HARDLINK, size=0, target=target)


def read_members(stream: Readable, *, where: str) -> Iterator[tuple[Member, Readable | None]]:
    """The archive's members in order, each FILE with its data (read or
    skipped before the next is asked for), each HARDLINK after its FILE."""
    links = _Links()
    for header, data in read_entries(stream, where=where):
        if header.name == TRAILER:
            for member in links.unclaimed():
                yield member, (io.BytesIO(b"") if member.kind is Kind.FILE else None)
            links = _Links()
            continue
        member = _member(header, where)
        if member.kind is Kind.SYMLINK:
            yield replace(member, target=_symlink_target(header, data, where)), None
        elif member.kind is Kind.FILE and header.nlink > 1:
            yield from _hardlinked(member, header, data, links)
        else:
            yield member, (data if member.kind is Kind.FILE else None)


def _hardlinked(member: Member, header: Header, data: EntryData,
                links: _Links) -> Iterator[tuple[Member, Readable | None]]:
    key = _inode_key(header)
    carrier = links.carriers.get(key)
    if carrier is not None:
        yield _link(member, carrier), None  # its data, if any, is a copy: skipped
        return
    if header.filesize == 0 and header.format in (Format.NEWC, Format.CRC):
        links.waiting.setdefault(key, []).append(member)
        return
    links.carriers[key] = member.name
    yield member, data
    for waiting in links.waiting.pop(key, []):
        yield _link(waiting, member.name), None


def _symlink_target(header: Header, data: EntryData, where: str) -> str:
    if header.filesize > SYMLINK_MAX:
        raise SourceError(f"{where}: {header.where}: symlink target of "
                          f"{header.filesize} bytes", hint=_CORRUPT_HINT)
    return os.fsdecode(data.read())


# --------------------------------------------------------------------- reader


class CpioReader:
    """A cpio archive (newc, crc, odc or binary), plain or compressed."""

    def __init__(self, path: Path, *, label: str, description: str) -> None:
        self.file = ArchiveFile(path, label)
        self.description = description

    def members(self) -> Iterator[tuple[Member, Readable | None]]:
        with self.file.stream() as stream:
            yield from read_members(stream, where=self.file.label)
