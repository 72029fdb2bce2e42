"""A directory tree removed, however deep.

Python 3.11's shutil.rmtree recurses once per level: a tree about 1,000
levels deep (an update's NEW side staged for squashfs, a hostile image's
journal directory) stops it with a RecursionError, and what is left stays.
This walk keeps one directory open at a time and climbs back through "..",
checked against the directory it came down from, so neither the stack nor
the open files grow with the depth.

It never follows a link and never goes into a mount point (a mount left
under a work directory keeps its content): each directory's mount is the
kernel's word for it (mnt_id in /proc/self/fdinfo, read from the open
directory itself, so a mount made meanwhile is seen too), since a bind of
a directory of the same filesystem has the same device number and its ".."
leads back up.  Where /proc cannot tell, no subdirectory is gone into."""

from __future__ import annotations

import errno
import os
import stat
from contextlib import suppress
from dataclasses import dataclass, field

_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Level:
    ident: tuple[int, int]  # st_dev, st_ino
    name: str  # in the level above
    pending: list[str] = field(default_factory=list)  # subdirectories still to go into


def remove_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """Remove the directory `path` (relative to `dir_fd` if given) and all
    it holds.  Gone already: nothing to do.  A link or a mount point given
    as `path` is refused (OSError), untouched.  What cannot be removed
    inside (a mount point, a directory that cannot be searched, an entry
    that went away or came in meanwhile) is left, the rest removed, and the
    first such error raised at the end as OSError."""
    top = os.fspath(path)
    if top.endswith("/"):  # "link/" would follow the link, whatever O_NOFOLLOW says
        top = top.rstrip("/")
        if not top:
            raise OSError(errno.EINVAL, "not a tree to remove", os.fspath(path))
    try:
        fd = os.open(top, _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    first: OSError | None = None
    try:
        mount = _mount_of(fd)
        _check_not_mounted(fd, mount, top)
        st = os.fstat(fd)
        levels = [_Level((st.st_dev, st.st_ino), top)]
        levels[-1].pending, first = _clear(fd)
        while True:
            level = levels[-1]
            if level.pending:
                name = level.pending.pop()
                try:
                    child = _enter(fd, name, level.ident, mount)
                except OSError as exc:  # gone, a link now, a mount point, not searchable
                    first = first or exc
                    continue
                os.close(fd)
                fd = child
                cst = os.fstat(fd)
                levels.append(_Level((cst.st_dev, cst.st_ino), name))
                levels[-1].pending, failed = _clear(fd)
                first = first or failed
                continue
            if len(levels) == 1:
                break
            parent = os.open("..", _OPEN, dir_fd=fd)  # searchable: _enter made sure
            pst = os.fstat(parent)
            os.close(fd)
            fd = parent
            levels.pop()
            if (pst.st_dev, pst.st_ino) != levels[-1].ident:
                raise OSError(errno.ESTALE, "the tree was moved while it was removed", top)
            try:
                os.rmdir(level.name, dir_fd=fd)
            except OSError as exc:
                first = first or exc
    finally:
        os.close(fd)
    try:
        os.rmdir(top, dir_fd=dir_fd)
    except OSError as exc:
        first = first or exc
    if first is not None:
        raise first


def discard_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """remove_tree for a work directory on the way out: what cannot be
    removed is left, without an error to hide the one that is on its way."""
    with suppress(OSError):
        remove_tree(path, dir_fd=dir_fd)


def _mount_of(fd: int) -> int | None:
    """The kernel's id of the mount the open file `fd` is on; None where
    /proc does not say."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_not_mounted(fd: int, mount: int | None, top: str) -> None:
    """OSError if the directory `fd` is a mount's top (its ".." is on
    another mount), whose filesystem is not the caller's to empty."""
    up = os.open("..", _OPEN, dir_fd=fd)
    try:
        above = _mount_of(up)
    finally:
        os.close(up)
    if mount is None or above is None:
        return  # nothing is gone into below it either
    if above != mount:
        raise OSError(errno.EBUSY, "a mount point, not a tree to remove", top)


def _enter(fd: int, name: str, ident: tuple[int, int], mount: int | None) -> int:
    """The subdirectory `name` of the directory `fd` (whose st_dev and
    st_ino are `ident`) opened, if it may be gone into: on the same mount,
    and searchable (its ".." opens, so the walk can climb back)."""
    child = os.open(name, _OPEN, dir_fd=fd)
    try:
        here = _mount_of(child)
        if mount is None or here is None:
            raise OSError(errno.EXDEV, "/proc does not say whether it is a mount point", name)
        if here != mount:
            raise OSError(errno.EXDEV, "a mount point is in the way", name)
        up = os.open("..", _OPEN, dir_fd=child)
        ust = os.fstat(up)
        os.close(up)
        if (ust.st_dev, ust.st_ino) != ident:
            raise OSError(errno.ESTALE, "it was moved while it was removed", name)
    except BaseException:
        os.close(child)
        raise
    return child


def _clear(fd: int) -> tuple[list[str], OSError | None]:
    """Unlink what is not a directory in the directory `fd`: the names of
    its subdirectories, to go into, and the first error met."""
    try:
        names = os.listdir(fd)
    except OSError as exc:
        return [], exc
    subdirs: list[str] = []
    first = None
    for name in names:
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                subdirs.append(name)
            else:
                os.unlink(name, dir_fd=fd)
        except OSError as exc:
            first = first or exc
    return subdirs, first
