"""A directory tree removed, however deep.

Python 3.11's shutil.rmtree recurses once per level: a tree about 1,000
levels deep (an update's NEW side staged for squashfs, a hostile image's
journal directory) stops it with a RecursionError, and what is left stays.
This walk keeps one directory open at a time and climbs back through "..",
checked against the directory it came down from, so neither the stack nor
the open files grow with the depth.  It never follows a link and never
goes into a mount point, another filesystem's or a bind of a directory
from elsewhere (a mount left under a work directory keeps its content)."""

from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import suppress
from dataclasses import dataclass, field

_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Level:
    ident: tuple[int, int]  # st_dev, st_ino
    name: str  # in the level above
    pending: list[str] = field(default_factory=list)  # subdirectories still to go into
    mounts: _Trie | None = None  # the mount points below it, by name


def remove_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """Remove the directory `path` (relative to `dir_fd` if given) and all
    it holds.  Gone already: nothing to do.  What cannot be removed (a
    mount point, an entry that went away or came in meanwhile) is left, the
    rest removed, and the first such error raised at the end as OSError."""
    try:
        fd = os.open(path, _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    first: OSError | None = None
    try:
        st = os.fstat(fd)
        levels = [_Level((st.st_dev, st.st_ino), os.fspath(path), mounts=_mounts_below(fd))]
        levels[-1].pending, first = _clear(fd)
        while True:
            level = levels[-1]
            if level.pending:
                name = level.pending.pop()
                below = level.mounts.get(name) if level.mounts else None
                try:
                    if below is not None and _MOUNTED in below:
                        raise OSError(errno.EXDEV, "a mount point is in the way", name)
                    child = _enter(fd, name, level.ident[0])
                except OSError as exc:  # gone, a link now, or a mount point
                    first = first or exc
                    continue
                os.close(fd)
                fd = child
                cst = os.fstat(fd)
                levels.append(_Level((cst.st_dev, cst.st_ino), name, mounts=below))
                levels[-1].pending, failed = _clear(fd)
                first = first or failed
                continue
            if len(levels) == 1:
                break
            parent = os.open("..", _OPEN, dir_fd=fd)
            pst = os.fstat(parent)
            os.close(fd)
            fd = parent
            levels.pop()
            if (pst.st_dev, pst.st_ino) != levels[-1].ident:
                raise OSError(errno.ESTALE, "the tree was moved while it was removed",
                              os.fspath(path))
            try:
                os.rmdir(level.name, dir_fd=fd)
            except OSError as exc:
                first = first or exc
    finally:
        os.close(fd)
    try:
        os.rmdir(path, dir_fd=dir_fd)
    except OSError as exc:
        first = first or exc
    if first is not None:
        raise first


def _enter(fd: int, name: str, dev: int) -> int:
    """The subdirectory `name` of the directory `fd`, on the device `dev`,
    opened; OSError for a mount point of another filesystem."""
    child = os.open(name, _OPEN, dir_fd=fd)
    if os.fstat(child).st_dev == dev:
        return child
    os.close(child)
    raise OSError(errno.EXDEV, "a mount point is in the way", name)


_MOUNTED = ""  # the key that marks a mount point in a _Trie (no name is empty)
_Trie = dict[str, "_Trie"]
_ESCAPED = re.compile(r"\\([0-7]{3})")


def _mounts_below(fd: int, *, mountinfo: str = "/proc/self/mountinfo") -> _Trie | None:
    """The mount points under the directory `fd`, as the kernel's table
    has them: a bind of a directory of the same filesystem has the same
    device number, and its ".." leads back up, so only the table tells it.
    None when there are none, or the table cannot be read."""
    try:
        top = os.readlink(f"/proc/self/fd/{fd}")
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            points = [_ESCAPED.sub(lambda m: chr(int(m[1], 8)), line.split(" ")[4])
                      for line in f if line.count(" ") >= 5]
    except OSError:
        return None
    trie: _Trie = {}
    prefix = top.rstrip("/") + "/"
    for point in points:
        if point.startswith(prefix):
            node = trie
            for name in point[len(prefix):].split("/"):
                node = node.setdefault(name, {})
            node[_MOUNTED] = {}
    return trie or None


def _clear(fd: int) -> tuple[list[str], OSError | None]:
    """Unlink what is not a directory in the directory `fd`: the names of
    its subdirectories, to go into, and the first error met."""
    subdirs: list[str] = []
    first = None
    for name in os.listdir(fd):
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                subdirs.append(name)
            else:
                os.unlink(name, dir_fd=fd)
        except OSError as exc:
            first = first or exc
    return subdirs, first


def discard_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """remove_tree for a work directory on the way out: what cannot be
    removed is left, without an error to hide the one that is on its way."""
    with suppress(OSError):
        remove_tree(path, dir_fd=dir_fd)
