"""What an update holds, entry by entry, whatever it came in (directory,
cpio, tar, filesystem image): the common currency of readers and planner."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from dmoverlay.core.compress import Readable


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

_BY_FORMAT = {bits: kind for kind, bits in FORMAT_BITS.items()}


def kind_of(mode: int) -> Kind | None:
    """The kind of an st_mode-style mode; None for a type Linux does not have
    (an archive's header can say anything)."""
    return _BY_FORMAT.get(stat.S_IFMT(mode))


def kind_on_disk(mode: int) -> Kind:
    """The kind of an entry lstat found.  Linux has no type outside
    FORMAT_BITS; were one to come, it is taken for a socket, a kind apply
    neither writes nor replaces."""
    return _BY_FORMAT.get(stat.S_IFMT(mode), Kind.SOCKET)


def member_name(spelled: str) -> str:
    """An entry's name as an archive spells it, with only a leading "./"
    removed: "." and "./" are the update's root, ""."""
    if spelled in (".", "./"):
        return ""
    return spelled.removeprefix("./")


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
    # FILE of a sparse archive member: where its data lies, (offset, length)
    # pairs; the rest are holes (the stream reads them as zeros)
    sparse: tuple[tuple[int, int], ...] | None = None


# The kernel's rule for an xattr name (fs/xattr.c): at most XATTR_NAME_MAX
# bytes, no NUL, and a name after one of its namespaces.  Readers, the
# image builder and the apply's policy all judge names by it.
XATTR_NAME_MAX = 255
XATTR_NAMESPACES = ("user.", "system.", "security.", "trusted.")


def xattr_name_problem(name: str) -> str | None:
    """Why Linux can hold no xattr named `name`, or None if it can."""
    if "\0" in name:
        return "the name holds a NUL byte"
    if len(os.fsencode(name)) > XATTR_NAME_MAX:
        return f"the name is longer than {XATTR_NAME_MAX} bytes"
    if not any(name.startswith(ns) and name != ns for ns in XATTR_NAMESPACES):
        return "no namespace Linux knows, with a name after it (user., system., security., " \
               "trusted.)"
    return None


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells a file changed: the same inode, size and times (writing
    data or metadata moves the ctime, which no one can set back)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass(frozen=True)
class InFile:
    """Where a FILE member's data lies, in one piece, in a regular file that
    outlives the reader: a directory's file, a member of a plain tar archive
    on disk.  It can be copied from there when it is written, if the file
    still has the identity it had when it was read."""

    path: str  # absolute
    offset: int
    size: int
    identity: tuple[int, ...]  # file_identity() of the file


class Located(Protocol):
    """A FILE's stream that can say where its data lies instead of reading it."""

    def located(self) -> InFile | None:
        """Where the data lies, for a consumer that copies it from there
        later (and checks the identity then): the pass then reads none of it.
        None when it must be read now."""


class UpdateReader(Protocol):
    """An update that can be read from start to end, more than once.

    Each pass yields the members in the update's order with, for a FILE, a
    stream of exactly `size` bytes that must be read (or skipped) before the
    next member is asked for; a stream may also be `Located`.  A pass that
    ends without an exception means the whole input was valid: compressed
    streams were read to their end, checksums matched, nothing was
    truncated (data taken by location is checked when it is copied)."""

    description: str

    def members(self) -> Iterator[tuple[Member, Readable | None]]: ...
