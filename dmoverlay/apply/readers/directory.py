"""A directory tree read as an update: a directory given as the update, or
a mounted image (image.py)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from dmoverlay.core.compress import Readable
from dmoverlay.core.entries import InFile, Kind, Member, file_identity, kind_of
from dmoverlay.core.errors import SourceError
from dmoverlay.core.sizes import KiB

CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap


class DirectoryReader:
    """A directory tree, walked in sorted order, parents before children.

    With `in_place` (the directory outlives the reader), file data is
    `Located`: a consumer may copy it later instead of reading it now."""

    def __init__(self, root: Path, *, description: str,
                 hide_empty_lost_found: bool = False, in_place: bool = False) -> None:
        self.root = root
        self.description = description
        # mkfs.ext4 makes lost+found in every ext image: an artifact of the
        # format, not something the update's author put there.
        self.hide_empty_lost_found = hide_empty_lost_found
        self.in_place = in_place

    def members(self) -> Iterator[tuple[Member, Readable | None]]:
        inodes: dict[tuple[int, int], str] = {}
        for name, full, st in self._walk():
            member = _dir_member(name, full, st, inodes)
            if member.kind is not Kind.FILE:
                yield member, None
                continue
            with _FileData(full, st, in_place=self.in_place) as data:
                yield member, data
                data.finish()

    def _walk(self) -> Iterator[tuple[str, str, os.stat_result]]:
        """Parents before children, names sorted; with a stack, not
        recursion, so that no depth a path can have is too deep, and a
        directory met again inside itself (a damaged or hostile image:
        ext4 knows no directory hard links) is an error, not a loop."""
        top = os.path.abspath(self.root)  # located data is found again from any directory
        try:
            st = os.stat(top)  # the directory named, even through a symlink
        except OSError as exc:
            raise _unreadable(top, exc) from None
        yield "", top, st
        on_path = {(st.st_dev, st.st_ino)}
        stack = [("", top, _names(top), (st.st_dev, st.st_ino))]
        while stack:
            rel, full_dir, names, inode = stack[-1]
            child = next(names, None)
            if child is None:
                stack.pop()
                on_path.discard(inode)
                continue
            name = f"{rel}/{child}" if rel else child
            full = os.path.join(full_dir, child)
            st = _lstat(full)
            if not rel and child == "lost+found" and self._hidden(full, st):
                continue
            yield name, full, st
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in on_path:
                    raise SourceError(f"{full}: a directory found inside itself",
                                      hint="the filesystem is damaged: check it with e2fsck")
                on_path.add(key)
                stack.append((name, full, _names(full), key))

    def _hidden(self, full: str, st: os.stat_result) -> bool:
        if not self.hide_empty_lost_found or not stat.S_ISDIR(st.st_mode):
            return False
        try:
            return not os.listdir(full)
        except OSError as exc:
            raise _unreadable(full, exc) from None


def _names(full_dir: str) -> Iterator[str]:
    try:
        return iter(sorted(os.listdir(full_dir)))
    except OSError as exc:
        raise _unreadable(full_dir, exc) from None


def _unreadable(full: str, exc: OSError) -> SourceError:
    hint = "run as root" if exc.errno in (errno.EACCES, errno.EPERM) else None
    if exc.errno == errno.EIO:
        hint = "the disk or image is damaged"
    return SourceError(f"cannot read {full}: {exc.strerror}", hint=hint)


def _lstat(full: str) -> os.stat_result:
    try:
        return os.lstat(full)
    except OSError as exc:
        raise _unreadable(full, exc) from None


def _dir_member(name: str, full: str, st: os.stat_result,
                inodes: dict[tuple[int, int], str]) -> Member:
    kind = kind_of(st.st_mode)
    if kind is None:
        raise SourceError(f"{full}: unknown file type {stat.S_IFMT(st.st_mode):#o}")
    target = ""
    if kind is Kind.FILE and st.st_nlink > 1:
        first = inodes.setdefault((st.st_dev, st.st_ino), name)
        if first != name:
            kind, target = Kind.HARDLINK, first
    elif kind is Kind.SYMLINK:
        try:
            target = os.readlink(full)
        except OSError as exc:
            raise _unreadable(full, exc) from None
    return Member(
        name=name,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        size=st.st_size if kind is Kind.FILE else 0,
        target=target,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0),
        xattrs=_xattrs(full),
    )


def _xattrs(full: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise _unreadable(full, exc) from None
    found = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(full, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise _unreadable(full, exc) from None
            if name.startswith("trusted.") and os.geteuid() != 0:
                # listed (as a FUSE mount does) but kept from a user: not
                # removed since, and leaving it out would change the update
                raise SourceError(f"cannot read {full}: its xattr {name} is for root only",
                                  hint="run as root") from None
            # else removed since it was listed
    return tuple(found)


class _FileData:
    """A file's data, exactly the size its lstat gave: a file that changes
    while it is read is an error, not a silently different update.  Opened
    only when read: a consumer that takes its location reads it later."""

    def __init__(self, full: str, st: os.stat_result, *, in_place: bool) -> None:
        self.full = full
        self.st = st
        self.remaining = st.st_size
        self.in_place = in_place
        self.taken = False
        self.fd = -1

    def located(self) -> InFile | None:
        if not self.in_place:
            return None
        self.taken = True
        return InFile(self.full, 0, self.st.st_size, file_identity(self.st))

    def _open(self) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(self.full, flags)
        except OSError as exc:
            raise _unreadable(self.full, exc) from None
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (self.st.st_dev, self.st.st_ino) \
                or not stat.S_ISREG(now.st_mode):
            os.close(fd)
            raise self._changed()
        self.fd = fd
        return fd

    def __enter__(self) -> _FileData:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def _changed(self) -> SourceError:
        return SourceError(f"{self.full} changed while it was read",
                           hint="leave the update alone while it is applied")

    def read(self, size: int = -1, /) -> bytes:
        want = self.remaining if size < 0 else min(size, self.remaining)
        fd = self.fd if self.fd >= 0 else self._open()
        parts: list[bytes] = []
        while want > 0:
            try:
                chunk = os.read(fd, min(want, CHUNK))
            except OSError as exc:
                raise _unreadable(self.full, exc) from None
            if not chunk:
                raise self._changed()
            parts.append(chunk)
            self.remaining -= len(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def finish(self) -> None:
        """Read what the consumer skipped, and check nothing follows (unless
        the consumer took the location: it checks the file when it copies)."""
        if self.taken:
            return
        while self.remaining:
            self.read(CHUNK)
        fd = self.fd if self.fd >= 0 else self._open()
        if os.read(fd, 1):
            raise self._changed()
