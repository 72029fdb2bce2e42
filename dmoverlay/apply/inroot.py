"""Touching files inside a root without ever leaving it.

Every directory is opened relative to the root's descriptor with openat2
and RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS: the planner resolved all links
already, so a symlink met here means the tree changed under us, and the
kernel refuses rather than following it anywhere."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
from contextlib import suppress
from dataclasses import dataclass, field

from dmoverlay.apply.plan import Where
from dmoverlay.core.entries import Kind, kind_on_disk
from dmoverlay.core.errors import InRootError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint)
_libc.syncfs.argtypes = (ctypes.c_int,)
_statx = getattr(_libc, "statx", None)  # glibc 2.28
if _statx is not None:
    _statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_void_p)
_renameat2 = _libc.renameat2
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()

SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_MNT_ID = 0x1000
_STATX_SIZE = 256
_STATX_MNT_ID_AT = 0x90  # offset of stx_mnt_id in struct statx
LIST_AFTER = 24  # lookups in one directory, after which it is listed instead


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))



def _raise_errno(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); retried on EAGAIN, which the kernel returns when a rename
    raced with the lookup."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    for _ in range(16):
        fd = _libc.syscall(SYS_OPENAT2, dir_fd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        if ctypes.get_errno() != errno.EAGAIN:
            break
    _raise_errno(f"openat2 {path}")
    raise AssertionError("unreachable")


def raw_name(name: str) -> bytes:
    """A name as the kernel takes it: os.fsencode, without its checks (a
    rename of every file of an update passes two)."""
    return name.encode(_FS_ENCODING, _FS_ERRORS)


def renameat2(old_fd: int, old: str | bytes, new_fd: int, new: str | bytes,
              flags: int) -> None:
    """renameat2(2); an EEXIST (RENAME_NOREPLACE) is a FileExistsError."""
    old_raw = old if isinstance(old, bytes) else raw_name(old)
    new_raw = new if isinstance(new, bytes) else raw_name(new)
    if _renameat2(old_fd, old_raw, new_fd, new_raw, flags) != 0:
        _raise_errno(f"rename {os.fsdecode(old)} -> {os.fsdecode(new)}")


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        _raise_errno("syncfs")


def mount_id(dir_fd: int, name: str = "") -> int | None:
    """The id of the mount `name` (in `dir_fd`, not followed if a link; the
    directory itself if "") is on, None if the kernel does not say (before
    Linux 5.8).  Two mounts of one filesystem have one st_dev but two ids,
    and a rename between them fails as between filesystems."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | (0 if name else AT_EMPTY_PATH)
    if _statx(dir_fd, raw_name(name), flags, STATX_MNT_ID, buf) != 0:
        _raise_errno(f"statx {name}")
    mask, = struct.unpack_from("<I", buf.raw)
    if not mask & STATX_MNT_ID:
        return None
    return int(struct.unpack_from("<Q", buf.raw, _STATX_MNT_ID_AT)[0])


@dataclass
class Trees:
    """The root and the live /run, opened once; directories below them opened
    on demand (beneath the tree, through no symlink) and kept open."""

    root: str
    run: str | None
    fds: dict[str, int] = field(default_factory=dict)
    dirs: dict[Where, int] = field(default_factory=dict)
    # for the planner: lookups per directory, and the kinds of the entries of
    # a directory it asked about often (one listing instead of many lstats)
    asked: dict[Where, int] = field(default_factory=dict)
    listed: dict[Where, dict[str, Kind]] = field(default_factory=dict)
    top_mounts: dict[str, tuple[int | None, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fds["root"] = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.run is not None:
            self.fds["run"] = os.open(self.run, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in [*self.dirs.values(), *self.fds.values()]:
            os.close(fd)
        self.dirs.clear()
        self.fds.clear()

    def __enter__(self) -> Trees:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def top(self, tree: str) -> int:
        return self.fds[tree]

    def dir_fd(self, where: Where) -> int:
        """A descriptor of the directory at `where`, opened without following
        any symlink and without leaving its tree."""
        if not where.path:
            return self.fds[where.tree]
        fd = self.dirs.get(where)
        if fd is None:
            try:
                fd = openat2(self.fds[where.tree], where.path,
                             os.O_RDONLY | os.O_DIRECTORY,
                             RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                raise InRootError(f"cannot open {where}: {exc.strerror}",
                                  hint="the tree changed while the update was applied") from None
            self.dirs[where] = fd
        return fd

    def forget(self, where: Where) -> None:
        """Drop cached descriptors at and below a place (it moved away)."""
        for w in [w for w in self.dirs if w.tree == where.tree and
                  (w.path == where.path or w.path.startswith(where.path + "/"))]:
            os.close(self.dirs.pop(w))

    # -- the planner's read-only view (applyplan.Tree)

    def lstat(self, where: Where) -> os.stat_result | None:
        if where.tree not in self.fds:
            return None
        try:
            return os.lstat(where.name, dir_fd=self.dir_fd(where.parent)) if where.path else \
                os.fstat(self.fds[where.tree])
        except (FileNotFoundError, NotADirectoryError):
            return None
        except InRootError:
            return None

    def kind(self, where: Where) -> Kind | None:
        """The kind of entry at `where`, None if there is none.  After
        LIST_AFTER questions about one directory, its entries are listed
        once: their kinds come with their names (d_type), no lstat each."""
        parent = where.parent
        listing = self.listed.get(parent)
        if listing is None and where.path and where.tree in self.fds:
            asked = self.asked[parent] = self.asked.get(parent, 0) + 1
            if asked >= LIST_AFTER:
                listing = self.listed[parent] = self._list(parent)
        if listing is not None:
            return listing.get(where.name)
        st = self.lstat(where)
        return None if st is None else kind_on_disk(st.st_mode)

    def _list(self, where: Where) -> dict[str, Kind]:
        try:
            fd = self.dir_fd(where)
        except InRootError:
            return {}
        found = {}
        with os.scandir(fd) as entries:
            for e in entries:
                if e.is_symlink():
                    found[e.name] = Kind.SYMLINK
                elif e.is_dir(follow_symlinks=False):
                    found[e.name] = Kind.DIR
                elif e.is_file(follow_symlinks=False):
                    found[e.name] = Kind.FILE
                else:  # a device, fifo or socket: the listing does not say which
                    with suppress(FileNotFoundError):  # gone since it was listed
                        found[e.name] = kind_on_disk(e.stat(follow_symlinks=False).st_mode)
        return found

    def readlink(self, where: Where) -> str:
        """The link's text; OSError if it is no longer a link (EINVAL) or
        gone (ENOENT): the tree changed since kind() was asked."""
        return os.readlink(where.name, dir_fd=self.dir_fd(where.parent))

    def listdir(self, where: Where) -> list[str]:
        return list_dir(self.dir_fd(where))

    def same_mount(self, where: Where) -> bool:
        """Whether a directory is on the mount of its tree's top: renames
        cannot cross mounts (nor filesystems, which are on other mounts).
        By mount id; by st_dev where the kernel gives no id.  A place that
        is gone or no directory is judged where it would be made."""
        top = self.fds[where.tree]
        if where.tree not in self.top_mounts:
            self.top_mounts[where.tree] = (mount_id(top), os.fstat(top).st_dev)
        top_id, top_dev = self.top_mounts[where.tree]
        try:
            parent = self.dir_fd(where.parent)
            st = os.lstat(where.name, dir_fd=parent)
            if not stat.S_ISDIR(st.st_mode):
                return True
            ident = mount_id(parent, where.name) if top_id is not None else None
        except (FileNotFoundError, NotADirectoryError, InRootError):
            return True
        return st.st_dev == top_dev and (ident is None or ident == top_id)


def list_dir(dir_fd: int) -> list[str]:
    """The names in the directory open at `dir_fd`, listed through a
    descriptor of their own, opened for reading."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)
