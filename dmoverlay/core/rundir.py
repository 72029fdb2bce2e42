"""The directory both live jobs keep under the run directory (/run/dmoverlay):
setup's state files and apply's staging.  It is trusted only as this user's
own: a real directory, not a link to elsewhere, that nobody else may write in.
An image or an earlier boot can plant anything there, so this is checked
where it is used, on what was opened, not on a path looked up again."""

from __future__ import annotations

import errno
import os
import stat

NAME = "dmoverlay"  # RUNDIR/dmoverlay


def why_not_private(st: os.stat_result) -> str | None:
    """Why an lstat'ed entry is not this user's private directory, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def open_private(name: str, *, dir_fd: int) -> tuple[int, str | None]:
    """Opens the entry `name` of `dir_fd` without following a link: (fd, None)
    when it is this user's private directory, else (-1, why not)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            return -1, exc.strerror
        try:  # a link gives ENOTDIR or ELOOP: say which thing it is
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as again:
            return -1, again.strerror
        return -1, why_not_private(st) or "replaced while it was opened"
    why = why_not_private(os.fstat(fd))
    if why is not None:
        os.close(fd)
        return -1, why
    return fd, None
