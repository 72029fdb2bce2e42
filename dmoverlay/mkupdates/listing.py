"""A tree or archive read into entries by path: what `diff` compares and
what `formats` writes.

Each side is read once, by apply's readers (so a side is whatever apply
takes: a directory, a tar or cpio archive, plain or compressed).  A file's
content is known by its SHA-256; the side whose files are written keeps
where their data lies (the file itself, or a spool for a decompressed
stream).  Hardlinks become groups: every name of a file is an entry, and
`group` is the same for all.  dmoverlay's journal (`.dmoverlay` at the top
of a root apply wrote to) is never part of a side; any other name apply
would refuse as a name (`..`, absolute, empty components, control
characters) is refused here, so that OLD's names and NEW's are compared as
apply reads them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from dmoverlay.apply.plan import RESERVED_TOP, Refused, split_name
from dmoverlay.core.compress import Readable
from dmoverlay.core.entries import InFile, Kind, Member, UpdateReader, file_identity
from dmoverlay.core.errors import ImageError, SourceError
from dmoverlay.core.sizes import KiB

CHUNK = 64 * KiB


@dataclass(frozen=True)
class Entry:
    """One name of a side.  `member.kind` is never HARDLINK: a file's other
    names are FILE entries whose `group` is the same (the first name)."""

    member: Member
    digest: bytes = b""  # FILE: SHA-256 of the data
    group: str = ""  # FILE: its inode's key in its side, the same for all its names

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def kind(self) -> Kind:
        return self.member.kind


class Blobs:
    """Where the data of a side's files lies, to be read again when written:
    in place (a directory's file, a plain tar's member, checked unchanged
    when read again) or in a spool file of our own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.spool = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed in close)
        self.where: dict[str, InFile | tuple[int, int]] = {}

    def close(self) -> None:
        self.spool.close()

    def keep(self, chunk: bytes, name: str) -> None:
        """Spool a piece of `name`'s data (an empty one: flush), or one
        error line when the disk is full."""
        try:
            if chunk:
                self.spool.write(chunk)
            else:
                self.spool.flush()
        except OSError as exc:
            raise ImageError(f"cannot keep the data of {name} in {self.directory}: "
                             f"{exc.strerror}",
                             hint="free some space beside the output, or write it "
                                  "elsewhere") from None

    def chunks(self, key: str) -> Iterator[bytes]:
        """The data of the file kept as `key` (its entry's group), in pieces."""
        place = self.where[key]
        if isinstance(place, InFile):
            yield from _located_chunks(place)
            return
        offset, size = place
        fd = self.spool.fileno()
        while size:
            chunk = os.pread(fd, min(CHUNK, size), offset)
            offset += len(chunk)
            size -= len(chunk)
            yield chunk


def _located_chunks(place: InFile) -> Iterator[bytes]:
    try:
        fd = os.open(place.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot read {place.path}: {exc.strerror}") from None
    try:
        if file_identity(os.fstat(fd)) != place.identity:
            raise SourceError(f"{place.path} changed while it was read",
                              hint="leave the trees alone while mkupdates runs")
        offset, left = place.offset, place.size
        while left:
            chunk = os.pread(fd, min(CHUNK, left), offset)
            if not chunk:
                raise SourceError(f"{place.path} changed while it was read",
                                  hint="leave the trees alone while mkupdates runs")
            offset += len(chunk)
            left -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


def read_side(reader: UpdateReader, blobs: Blobs | None = None) -> dict[str, Entry]:
    """Every entry of a side by name (the top, "", left out: apply keeps the
    root's own metadata), in the reader's order; a name given twice is the
    later one, as apply takes it.  With `blobs`, each file's data is kept
    findable there."""
    found: dict[str, Entry] = {}
    for n, (member, stream) in enumerate(reader.members()):
        name = member.name.rstrip("/")
        if not name or name == RESERVED_TOP or name.startswith(RESERVED_TOP + "/"):
            continue
        _check_name(reader.description, name)
        member = replace(member, name=name)
        if member.kind is Kind.HARDLINK:
            found[name] = _hardlink(member, found)
        elif member.kind is Kind.FILE:
            assert stream is not None
            # keyed by its place in the pass, not its name: a later member
            # of the same name must not take the data of this one's links
            key = str(n)
            digest = _digest(key, stream, blobs, name)
            found[name] = Entry(replace(member, sparse=None), digest, key)
        else:
            found[name] = Entry(member)
    return found


def _check_name(where: str, name: str) -> None:
    try:
        split_name(name)
    except Refused as exc:
        raise SourceError(f"{where}: {name!r}: {exc.reason}",
                          hint=exc.hint or "apply would refuse it") from None


def _hardlink(member: Member, found: Mapping[str, Entry]) -> Entry:
    first = found.get(member.target.removeprefix("./").rstrip("/"))
    if first is None or first.kind is not Kind.FILE:
        raise SourceError(f"{member.name}: a hardlink to {member.target!r}, which is not an "
                          "earlier file", hint="the archive is malformed")
    return replace(first, member=replace(first.member, name=member.name))


def _digest(key: str, stream: Readable, blobs: Blobs | None, name: str) -> bytes:
    """The data's SHA-256, read once: from where it lies when the reader
    says, else from the stream (spooled on the way when kept)."""
    located = getattr(stream, "located", None)
    place = located() if located is not None else None
    h = hashlib.sha256()
    if isinstance(place, InFile):
        for chunk in _located_chunks(place):
            h.update(chunk)
        if blobs is not None:
            blobs.where[key] = place
        return h.digest()
    start = blobs.spool.seek(0, os.SEEK_END) if blobs is not None else 0
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if blobs is not None:
            blobs.keep(chunk, name)
    if blobs is not None:
        blobs.keep(b"", name)
        blobs.where[key] = (start, size)
    return h.digest()
