"""The one tar reader, for `dmoverlay build` and `dmoverlay apply` alike: a
tar archive (ustar, pax, GNU, v7; plain or compressed) as a stream of
`Member`s, with every check in one place.

Python's tarfile reads the headers it is given; what it does not check is
checked here: what follows the last member (tarfile stops without a word
at a damaged header), the size of extension headers (it reads a GNU long
name or a pax header whole into memory, whatever size it claims), and the
numbers in pax records."""

from __future__ import annotations

import os
import re
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dmoverlay.core import tarheader
from dmoverlay.core.compress import STREAM_ERRORS, Readable, open_decompressed
from dmoverlay.core.entries import (
    InFile,
    Kind,
    Member,
    file_identity,
    member_name,
    xattr_name_problem,
)
from dmoverlay.core.errors import HeaderRefused, NotRegular, SourceError
from dmoverlay.core.sizes import KiB
from dmoverlay.core.tarheader import MAX_MAJOR, MAX_MINOR, TYPEFLAGS, plain_header

CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap
DAMAGED = "the archive is damaged or truncated: download or re-create it"
HOSTILE = "the archive is malformed or hostile: re-create it with GNU tar or bsdtar"

# tarfile reads an extension header (a GNU long name or link, a pax header)
# whole into memory, whatever size it claims: 800 MB of long name took 4 GB.
# Real ones hold a path or a few xattrs (a SELinux label, a capability).
HEADER_CAP = 1 << 20
CHAIN_CAP = 8  # extension headers in a row before a member (tarfile recurses)
SPARSE_CAP = 1 << 18  # (offset, length) pairs of one sparse member's map
_EXTENSIONS = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})
# What the filesystems we write hold: 32-bit owners (the last value means
# "none"), ext4's times (1901 to 2446) and file size (16 TiB in 4 KiB blocks).
MAX_ID = 0xFFFFFFFE
MIN_TIME_NS, MAX_TIME_NS = -(2**31) * 10**9, (tarheader.MAX_SECONDS + 1) * 10**9 - 1
MAX_SIZE = 16 << 40



def open_regular(path: Path, label: str) -> BinaryIO:
    """Open a file that must still be a regular file (non-blocking, so a
    fifo swapped in cannot hang us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise SourceError(f"cannot read {label}: {exc.strerror}") from None
    raw = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raw.close()
        raise NotRegular(f"{label}: not a regular file")
    return raw


# -------------------------------------------------------------------- headers


_number = tarfile.nti  # type: ignore[attr-defined]  # a header's number, octal or base-256



class CheckedInfo(tarfile.TarInfo):
    """tarfile's header reading with limits: an extension header over
    HEADER_CAP, more than CHAIN_CAP of them in a row, or a sparse map of
    more than SPARSE_CAP pieces is refused from the header that says so,
    before tarfile reads (and keeps) what it claims to hold.  Numbers it
    cannot read in a sparse map are refused too (tarfile lets a ValueError
    through)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        chain = getattr(tar, "extension_chain", 0)
        if self.type in _EXTENSIONS:
            if self.size > HEADER_CAP:
                raise self._refused(f"an extension header of {self.size} bytes (at most "
                                    f"{HEADER_CAP} are read)")
            if chain >= CHAIN_CAP:
                raise self._refused(f"more than {CHAIN_CAP} extension headers in a row")
        tar.extension_chain = chain + 1 if self.type in _EXTENSIONS else 0  # type: ignore[attr-defined]
        try:
            return super()._proc_member(tar)  # type: ignore[misc,no-any-return]
        except (ValueError, OverflowError) as exc:
            raise self._refused(f"unreadable ({exc})") from None

    def _refused(self, what: str) -> HeaderRefused:
        return HeaderRefused(f"tar header at offset {self.offset}: {what}", hint=HOSTILE)

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        """Old GNU sparse ("S"): pieces in the header, 21 more in each of a
        chain of blocks after it, counted as they come."""
        pieces, extended, real_size = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        fileobj = tar.fileobj
        assert fileobj is not None
        while extended:
            block = fileobj.read(tarheader.BLOCK)
            if len(block) < tarheader.BLOCK:
                raise tarfile.ReadError("unexpected end of data")
            for at in range(0, 21 * 24, 24):
                try:
                    offset, length = _number(block[at:at + 12]), _number(block[at + 12:at + 24])
                except ValueError:
                    break
                if offset and length:  # as tarfile reads them
                    pieces.append((offset, length))
            if len(pieces) > SPARSE_CAP:
                raise self._refused(f"a sparse map of more than {SPARSE_CAP} pieces")
            extended = bool(block[504])
        self.sparse = pieces
        self.offset_data = fileobj.tell()
        tar.offset = self.offset_data + tarheader.data_blocks(self.size)
        self.size = real_size
        return self

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str],
                           tar: tarfile.TarFile) -> None:
        """GNU sparse 1.0: the map's length, then its numbers, one a line,
        at the start of the data."""
        fileobj = tar.fileobj
        assert fileobj is not None
        count_text, _, rest = fileobj.read(tarheader.BLOCK).partition(b"\n")
        if not count_text.isdigit() or int(count_text) > SPARSE_CAP:
            raise self._refused(f"a sparse map of {count_text[:20]!r} pieces (at most "
                                f"{SPARSE_CAP})")
        numbers: list[int] = []
        while len(numbers) < 2 * int(count_text):
            if b"\n" not in rest:
                if len(rest) > 20:  # no number of a map has more digits: refused
                    raise self._refused("a sparse map line over 20 digits")  # (not regrown)
                block = fileobj.read(tarheader.BLOCK)
                if len(block) < tarheader.BLOCK:
                    raise tarfile.ReadError("unexpected end of data")
                rest += block
            number, _, rest = rest.partition(b"\n")
            numbers.append(int(number))
        next.offset_data = fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))  # type: ignore[assignment]


# ------------------------------------------------------------------- archives


class Guarded:
    """Decompressor and tarfile errors, raised while anyone reads, become
    one-line SourceErrors."""

    def __init__(self, inner: Readable, label: str) -> None:
        self.inner = inner
        self.label = label

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self.inner.read(size)
        except SourceError:
            raise
        except (tarfile.TarError, *STREAM_ERRORS) as exc:
            raise corrupt(self.label, exc) from None


def corrupt(label: str, exc: BaseException) -> SourceError:
    return SourceError(f"{label}: corrupt or truncated ({exc})", hint=DAMAGED)


class ArchiveFile:
    """An archive file, opened afresh for each pass, which fails if the file
    changed during the pass."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label

    @contextmanager
    def opened(self) -> Iterator[tuple[BinaryIO, tuple[int, ...]]]:
        """The file as it is, and its identity (`file_identity`)."""
        with open_regular(self.path, self.label) as raw:
            before = file_identity(os.fstat(raw.fileno()))
            yield raw, before
            if file_identity(os.fstat(raw.fileno())) != before:
                raise SourceError(f"{self.label} changed while it was read",
                                  hint="leave the update alone while it is applied")

    @contextmanager
    def stream(self) -> Iterator[Readable]:
        """The file's content, decompressed, checked to its end."""
        with self.opened() as (raw, _):
            try:
                with open_decompressed(self.label, raw) as stream:
                    yield Guarded(stream, self.label)
                    stream.drain()
            except (tarfile.TarError, *STREAM_ERRORS) as exc:
                raise corrupt(self.label, exc) from None


class ZeroWatch:
    """Counts the bytes read and keeps the last two reads: only what follows
    the end-of-archive marker must be zeros, and tarfile reads in records
    (10 KiB) and less than one past the marker, so the data before it need
    not be looked at."""

    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.count = 0
        self.before = self.last = b""

    def read(self, size: int = -1, /) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        self.before, self.last = self.last, data
        return data

    def zeros_after(self, end: int) -> bool:
        """Read to the end of the stream: whether all after offset `end` is zero."""
        start = self.count - len(self.before) - len(self.last)
        if end < start:
            return False  # read past unseen: tarfile never reads that far ahead
        tail = (self.before + self.last)[end - start:]
        clean = tail.count(0) == len(tail)
        while data := self.inner.read(CHUNK):
            self.count += len(data)
            clean = clean and data.count(0) == len(data)
        return clean


class TarReader:
    """A tar archive (ustar, pax, GNU, v7), plain or compressed.

    With `in_place` (a plain archive that outlives the reader), the pass
    reads the headers only, seeking over the data, which is `Located`."""

    def __init__(self, path: Path, *, label: str, description: str,
                 in_place: bool = False, fast: bool = True) -> None:
        self.file = ArchiveFile(path, label)
        self.description = description
        self.in_place = in_place
        self.fast = fast  # plain headers read by tarheader (False: all by tarfile)

    def members(self) -> Iterator[tuple[Member, Readable | None]]:
        try:
            yield from self._members_in_place() if self.in_place else self._members_streamed()
        except HeaderRefused as exc:
            raise SourceError(f"{self.file.label}: {exc.message}", hint=exc.hint) from None

    def _members_in_place(self) -> Iterator[tuple[Member, Readable | None]]:
        label = self.file.label
        path = os.path.abspath(self.file.path)  # found again from any directory
        with self.file.opened() as (raw, identity):
            fd, size = raw.fileno(), identity[2]
            headers = _Positioned(fd)
            try:
                with tarfile.open(fileobj=headers, mode="r:",  # type: ignore[call-overload]
                                  tarinfo=CheckedInfo) as tar:
                    offset = 0
                    while True:
                        # plain headers read here; tarfile reads the rest, and
                        # every header after a global pax one (it applies to all)
                        buf = b"" if tar.pax_headers or not self.fast else headers.header_at(offset)
                        member = plain_header(buf) if buf else None
                        if member is not None:
                            offset += tarheader.BLOCK
                            if member.kind is Kind.FILE:
                                place = InFile(path, offset, member.size, identity)
                                offset += tarheader.data_blocks(member.size)
                                if offset > size:
                                    raise tarfile.ReadError("unexpected end of data")
                                yield member, _InArchive(fd, place, label)
                            else:
                                yield member, None
                            continue
                        if offset:  # else the first member, which tarfile read at open
                            tar.offset, tar.firstmember = offset, None
                        info = tar.next()
                        if info is None:
                            break
                        yield self._member(tar, info, InFile(path, info.offset_data, info.size,
                                                             identity), fd)
                        offset = tar.offset
                    end = tar.offset
            except (tarfile.TarError, OSError) as exc:  # tarfile checked the data is there
                raise corrupt(label, exc) from None
            check_tar_end(label, size, end, _zeros(fd, end, size, label))

    def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, place: InFile,
                fd: int) -> tuple[Member, Readable | None]:
        label = self.file.label
        member = tar_member(info, label)
        if member.kind is not Kind.FILE:
            return member, None
        if info.issparse():  # its data is not in one piece
            return member, Guarded(_extracted(tar, info), label)
        return member, _InArchive(fd, place, label)

    def _members_streamed(self) -> Iterator[tuple[Member, Readable | None]]:
        label = self.file.label
        with self.file.stream() as stream:
            watch = ZeroWatch(stream)
            with tarfile.open(fileobj=watch, mode="r|",  # type: ignore[call-overload]
                              tarinfo=CheckedInfo) as tar:
                for info in tar:
                    member = tar_member(info, label)
                    data = tar.extractfile(info) if member.kind is Kind.FILE else None
                    yield member, (None if data is None else Guarded(data, label))
                end = tar.offset
            zeros = watch.zeros_after(end)
            check_tar_end(label, watch.count, end, zeros)


class _Positioned:
    """A file read at a position of our own, from a block read ahead: tarfile
    asks for tell() three times a member, and BufferedReader makes an lseek
    for each."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.block = b""
        self.block_at = 0

    def tell(self) -> int:
        return self.pos

    def header_at(self, offset: int) -> bytes:
        """The 512 bytes at `offset` (fewer at the end), from the block read
        ahead when they are in it; the position stays."""
        start = offset - self.block_at
        if not (start >= 0 and start + tarheader.BLOCK <= len(self.block)):
            self.block, self.block_at, start = os.pread(self.fd, CHUNK, offset), offset, 0
        return self.block[start:start + tarheader.BLOCK]

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self.pos
        elif whence == os.SEEK_END:
            pos += os.fstat(self.fd).st_size
        self.pos = pos
        return pos

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self.fd).st_size - self.pos)
        start = self.pos - self.block_at
        if start >= 0 and start + size <= len(self.block):
            data = self.block[start:start + size]
        elif size >= CHUNK:
            data = os.pread(self.fd, size, self.pos)
        else:
            self.block, self.block_at = os.pread(self.fd, CHUNK, self.pos), self.pos
            data = self.block[:size]
        self.pos += len(data)
        return data


def _extracted(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Readable:
    data = tar.extractfile(info)
    assert data is not None  # a regular file's
    return data


class _InArchive:
    """A member's data in a plain archive, read where it lies (with pread:
    tarfile's place in the file stays), or `Located` there."""

    def __init__(self, fd: int, place: InFile, label: str) -> None:
        self.fd = fd
        self.place = place
        self.label = label
        self.done = 0

    def located(self) -> InFile:
        return self.place

    def read(self, size: int = -1, /) -> bytes:
        left = self.place.size - self.done
        want = left if size < 0 else min(size, left)
        parts: list[bytes] = []
        while want > 0:
            try:
                chunk = os.pread(self.fd, min(want, CHUNK), self.place.offset + self.done)
            except OSError as exc:
                raise SourceError(f"cannot read {self.label}: {exc.strerror}") from None
            if not chunk:
                raise corrupt(self.label, EOFError("unexpected end of data"))
            parts.append(chunk)
            self.done += len(chunk)
            want -= len(chunk)
        return b"".join(parts)


def _zeros(fd: int, offset: int, size: int, label: str) -> bool:
    """Whether the file holds only zeros from `offset` to `size`."""
    while offset < size:
        try:
            chunk = os.pread(fd, min(CHUNK, size - offset), offset)
        except OSError as exc:
            raise SourceError(f"cannot read {label}: {exc.strerror}") from None
        if not chunk or chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
    return True


def check_tar_end(label: str, size: int, end: int, zeros: bool) -> None:
    """Python's tarfile stops without a word at a damaged header after the
    first, and a plain archive cut at a member boundary reads as a shorter
    valid one: only what follows the last member (from `end` to the archive's
    `size`, `zeros` or not) tells these apart."""
    if size < end + tarfile.BLOCKSIZE:
        raise SourceError(f"{label}: truncated tar archive (no end-of-archive marker "
                          f"at offset {end})", hint=DAMAGED)
    if not zeros:
        raise SourceError(f"{label}: unreadable tar header at offset {end}, or data after "
                          "the end-of-archive marker", hint=DAMAGED)


def tar_member(info: tarfile.TarInfo, label: str) -> Member:
    """A tar header as a Member, its numbers checked against what the
    filesystems we write hold; sparse files come out at their full size,
    with their map."""
    _check_numbers(info, label)
    kind = Kind.FILE if info.isreg() else TYPEFLAGS.get(info.type)
    if kind is None:
        raise SourceError(f"{label}: {info.name!r}: unsupported tar entry type {info.type!r}",
                          hint="re-create the archive with GNU tar or bsdtar")
    target = ""
    if kind is Kind.SYMLINK:
        target = info.linkname
    elif kind is Kind.HARDLINK:
        target = member_name(info.linkname)
    return Member(
        name=member_name(info.name),
        kind=kind,
        mode=stat.S_IMODE(info.mode),
        uid=info.uid,
        gid=info.gid,
        mtime_ns=tar_mtime_ns(info),
        size=info.size if kind is Kind.FILE else 0,
        target=target,
        rdev=(info.devmajor, info.devminor) if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0),
        xattrs=tar_xattrs(info),
        sparse=_sparse_map(info, label) if kind is Kind.FILE else None,
    )




# ------------------------------------------------------------- header fields


def tar_header_checksum_ok(head: bytes) -> bool:
    """Old v7 archives have no magic, only a header checksum: the byte sum of
    the header with its own checksum field counted as spaces."""
    try:
        return len(head) >= tarheader.BLOCK and tarheader.octal(head[148:156]) == \
            tarheader.checksum(head)
    except ValueError:
        return False


def tar_mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, within what ext4 holds."""
    ns = _mtime_ns(member)
    if not MIN_TIME_NS <= ns <= MAX_TIME_NS:
        raise SourceError(f"{member.name!r}: time {ns // 10**9} s is outside what ext4 "
                          "holds (1901 to 2446)", hint=HOSTILE)
    return ns


def _mtime_ns(member: tarfile.TarInfo) -> int:
    # pax keeps sub-second times as a decimal string; a float would round it.
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 1_000_000_000
    from decimal import Decimal  # here: only pax archives keep sub-second times

    try:
        seconds = Decimal(text)
        if not seconds.is_finite():
            raise ValueError(text)
        if not seconds.copy_abs() < 2**40:  # before int(): 1e999999999 has a billion digits
            raise SourceError(f"{member.name!r}: time {text[:40]!r} is outside what ext4 "
                              "holds (1901 to 2446)", hint=HOSTILE)
        return int(seconds * 1_000_000_000)
    except (ArithmeticError, ValueError):  # not a number, NaN
        raise SourceError(f"{member.name!r}: unreadable time {text!r} in its pax header",
                          hint="the archive is damaged; re-create it") from None


def tar_xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key.removeprefix("SCHILY.xattr.")
            check_xattr_name(member.name, name)
            found[name] = value.encode("utf-8", "surrogateescape")
    return tuple(sorted(found.items()))


# Of system.*, the filesystems we write (ext4, tmpfs) keep the POSIX ACLs
# only: setxattr refuses any other, and debugfs stores it where the kernel
# never shows it.
XATTR_SYSTEM = ("system.posix_acl_access", "system.posix_acl_default")


def check_xattr_name(path: str, name: str) -> None:
    """An xattr name Linux can hold (entries.xattr_name_problem) in a file
    of ext4 or tmpfs, or one clear error."""
    problem = xattr_name_problem(name)
    if problem is None and name.startswith("system.") and name not in XATTR_SYSTEM:
        problem = "no namespace ext4 and tmpfs keep (of system.*, only POSIX ACLs)"
    if problem is not None:
        raise SourceError(f"{path!r}: xattr {name[:40]!r}: {problem}",
                          hint="files keep user.*, trusted.*, security.* and POSIX ACLs")


_PAX_NUMBER = re.compile(r"[0-9]{1,40}", re.ASCII)


def _check_numbers(info: tarfile.TarInfo, label: str) -> None:
    """pax records carry numbers of any size: one clear line for those no
    filesystem we write can hold (not a traceback from chown or utime)."""
    where = f"{label}: {info.name!r}"
    for key in ("uid", "gid", "size"):
        # tarfile reads a number it cannot parse (over 4300 digits, say) as 0
        text = info.pax_headers.get(key)
        if text is not None and not (_PAX_NUMBER.fullmatch(text)
                                     and int(text) == getattr(info, key)):
            raise SourceError(f"{where}: unreadable {key} {text[:40]!r} in its pax header",
                              hint=HOSTILE)
    for what, value in (("uid", info.uid), ("gid", info.gid)):
        if not 0 <= value <= MAX_ID:
            raise SourceError(f"{where}: {what} {value} is not a 32-bit owner", hint=HOSTILE)
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) and not (
            0 <= info.devmajor <= MAX_MAJOR and 0 <= info.devminor <= MAX_MINOR):
        raise SourceError(f"{where}: device {info.devmajor}:{info.devminor} is not one Linux "
                          f"numbers (majors up to {MAX_MAJOR}, minors up to {MAX_MINOR})",
                          hint=HOSTILE)
    if not 0 <= info.size <= MAX_SIZE:
        raise SourceError(f"{where}: size {info.size} is more than a file can hold",
                          hint=HOSTILE)


def _sparse_map(info: tarfile.TarInfo, label: str) -> tuple[tuple[int, int], ...] | None:
    """The member's (offset, length) pieces of data, checked to lie in order
    within the file; None for a file that is not sparse."""
    pieces = getattr(info, "sparse", None)
    if pieces is None:
        return None
    # zero-length pieces carry nothing (GNU tar ends its map with one, and
    # pads the old header's four slots with (0, 0))
    pieces = [(offset, length) for offset, length in pieces if length]
    end = 0
    for offset, length in pieces:
        if offset < end or length < 0 or offset + length > info.size:
            raise SourceError(f"{label}: {info.name!r}: sparse map out of order or past the "
                              "file's end", hint=HOSTILE)
        end = offset + length
    return tuple(pieces)
