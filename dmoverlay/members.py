"""What an update holds, entry by entry, whatever it came in (directory,
cpio, tar, filesystem image): the common currency of readers and planner."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from dmoverlay.compress import Readable


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"  # another name for an earlier FILE of the same update
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"


FORMAT_BITS = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
}


@dataclass(frozen=True)
class Member:
    """One entry of an update.

    `name` is the entry's path as the update spells it, with only a leading
    "./" removed ("usr/lib/libfoo.so"; "" for the update's root).  Readers do
    not judge names: the planner refuses what is unsafe, so that every
    refusal is decided, worded and tested in one place."""

    name: str
    kind: Kind
    mode: int = 0o644  # permission bits, setuid/setgid/sticky included
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0  # bytes of data (FILE)
    target: str = ""  # SYMLINK: the link's text; HARDLINK: the earlier member's name
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()


class UpdateReader(Protocol):
    """An update that can be read from start to end, more than once.

    Each pass yields the members in the update's order with, for a FILE, a
    stream of exactly `size` bytes that must be read (or skipped) before the
    next member is asked for.  A pass that ends without an exception means
    the whole input was valid: compressed streams were read to their end,
    checksums matched, nothing was truncated.  `digest()` after a pass is a
    SHA-256 over everything the pass read, so a second pass can prove it saw
    the same update as the first."""

    description: str

    def members(self) -> Iterator[tuple[Member, Readable | None]]: ...

    def digest(self) -> str: ...
