"""The three containers an update is written in, each byte for byte the
same for the same members (SOURCE_DATE_EPOCH and owners are decided
before; here nothing is taken from the clock, the host or the order of a
directory).

- cpio (newc) compressed with gzip: anaconda's updates.img, as
  `find . | cpio -o -H newc | gzip -9` makes it, read by the kernel's and
  dracut's unpackers and by apply.  Inodes are numbered in member order;
  a hardlink group's names share one number and, as GNU cpio writes them,
  its data goes with the last name.  The gzip header holds no name and a
  zero mtime.  newc has no room for xattrs, nor for times before 1970 or
  after 2106, nor for files of 4 GiB or more: such members are refused.
- tar (pax) compressed with zstd: xattrs as SCHILY.xattr records, which
  GNU tar, bsdtar and apply read.  Owners are numeric (no names).
- squashfs, by mksquashfs from a staged tree (root is needed to stage
  files of other owners or security.*/trusted.* xattrs, unless
  `--all-root`)."""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from dmoverlay.core.entries import FORMAT_BITS, Kind, Member
from dmoverlay.core.errors import UsageError
from dmoverlay.core.run import run

Data = Callable[[Member], Iterator[bytes]]  # a FILE member's data


class Format(StrEnum):
    CPIO = "cpio.gz"
    TAR_ZST = "tar.zst"
    SQUASHFS = "squashfs"


ZSTD_LEVEL = 12
SQUASHFS_COMPRESSOR = "gzip"  # every kernel that mounts squashfs reads it
_U32 = 0xFFFFFFFF
SYMLINK_MAX = 4095  # PATH_MAX less its NUL: the kernel makes no longer link


# ------------------------------------------------------------------ cpio


def cpio_problem(m: Member) -> str | None:
    """What a member holds that newc cannot carry, or None."""
    if m.xattrs:
        return f"xattrs ({', '.join(k for k, _ in m.xattrs)}), which cpio (newc) cannot carry"
    if not 0 <= m.mtime_ns // 10**9 <= _U32:
        return "a time outside cpio's (newc) 1970-2106"
    if m.size > _U32:
        return "a file of 4 GiB or more, which cpio (newc) cannot carry"
    if m.kind is Kind.SYMLINK and len(os.fsencode(m.target)) > SYMLINK_MAX:
        return f"a symlink target longer than {SYMLINK_MAX} bytes"
    return None


def squashfs_problem(m: Member) -> str | None:
    """What a member holds that squashfs cannot carry, or None: its times
    are 32-bit seconds, so another time would be written as a different one
    (or stop mksquashfs)."""
    if not 0 <= m.mtime_ns // 10**9 <= _U32:
        return "a time outside squashfs's 1970-2106"
    return None


def _newc_header(*, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int,
                 size: int, rdev: tuple[int, int], name: bytes) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1],
              len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return head + b"\0" * (-len(head) % 4)


def _cpio_numbers(members: Sequence[Member]) -> tuple[list[int], dict[str, int], dict[str, str]]:
    """Each member's inode number (a hardlink group shares its file's), the
    count of names of each group's file, and the last name of each group."""
    inos: list[int] = []
    by_file: dict[str, int] = {}
    names: dict[str, int] = {}
    last: dict[str, str] = {}
    for i, m in enumerate(members, 1):
        file = m.target if m.kind is Kind.HARDLINK else m.name
        inos.append(by_file.setdefault(file, i))
        if m.kind in (Kind.FILE, Kind.HARDLINK):
            names[file] = names.get(file, 0) + 1
            last[file] = m.name
    return inos, names, last


def write_cpio(members: Sequence[Member], data: Data, out: BinaryIO) -> None:
    inos, names, last = _cpio_numbers(members)
    files = {m.name: m for m in members if m.kind is Kind.FILE}
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as z:
        for m, ino in zip(members, inos, strict=True):
            body, size, nlink = _cpio_body(m, files, names, last, data)
            kind = Kind.FILE if m.kind is Kind.HARDLINK else m.kind
            z.write(_newc_header(ino=ino, mode=FORMAT_BITS[kind] | m.mode, uid=m.uid,
                                 gid=m.gid, nlink=nlink, mtime=m.mtime_ns // 10**9,
                                 size=size, rdev=m.rdev, name=_spelled(m.name)))
            _write_body(z, body, size, m.name)
        z.write(_newc_header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, size=0,
                             rdev=(0, 0), name=b"TRAILER!!!"))
        z.write(b"\0" * (-z.tell() % 512))  # as GNU cpio: whole 512-byte blocks


def _spelled(name: str) -> bytes:
    """A member's name in the archive: the top is ".", as `find .` says."""
    return os.fsencode(name or ".")


def _cpio_body(m: Member, files: dict[str, Member], names: dict[str, int],
               last: dict[str, str], data: Data) -> tuple[Iterable[bytes], int, int]:
    """A member's data, its size and its link count."""
    if m.kind in (Kind.FILE, Kind.HARDLINK):
        file = files[m.target if m.kind is Kind.HARDLINK else m.name]
        if last[file.name] == m.name:
            return data(file), file.size, names[file.name]
        return (), 0, names[file.name]
    if m.kind is Kind.SYMLINK:
        target = os.fsencode(m.target)
        return (target,), len(target), 1
    return (), 0, 2 if m.kind is Kind.DIR else 1


def _write_body(z: gzip.GzipFile, body: Iterable[bytes], size: int, name: str) -> None:
    done = 0
    for chunk in body:
        z.write(chunk)
        done += len(chunk)
    if done != size:
        raise UsageError(f"{name} changed while the update was written",
                         hint="leave the trees alone while mkupdates runs")
    z.write(b"\0" * (-size % 4))


# ------------------------------------------------------------------ tar


class _Chunks(io.RawIOBase):
    """An iterator of chunks as the file object tarfile reads from."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if not self.left:
            self.left = next(self.chunks, b"")
        n = min(len(buf), len(self.left))
        buf[:n] = self.left[:n]
        self.left = self.left[n:]
        return n


_TAR_TYPES = {Kind.FILE: tarfile.REGTYPE, Kind.DIR: tarfile.DIRTYPE,
              Kind.SYMLINK: tarfile.SYMTYPE, Kind.HARDLINK: tarfile.LNKTYPE,
              Kind.CHAR: tarfile.CHRTYPE, Kind.BLOCK: tarfile.BLKTYPE,
              Kind.FIFO: tarfile.FIFOTYPE}


def _tarinfo(m: Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(m.name or ".")
    info.type = _TAR_TYPES[m.kind]
    info.mode = m.mode
    info.uid, info.gid = m.uid, m.gid
    info.uname = info.gname = ""
    info.mtime = m.mtime_ns // 10**9
    info.size = m.size if m.kind is Kind.FILE else 0
    info.linkname = m.target
    info.devmajor, info.devminor = m.rdev
    info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                        for k, v in m.xattrs}
    return info


def write_tar(members: Sequence[Member], data: Data, out: BinaryIO) -> None:
    """A pax archive (uncompressed: `zstd` compresses it after)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            if m.kind is Kind.SOCKET:
                raise UsageError(f"{m.name}: a socket, which tar cannot carry")
            info = _tarinfo(m)
            body = io.BufferedReader(_Chunks(data(m))) if m.kind is Kind.FILE else None
            tar.addfile(info, body)


def zstd(plain: Path, out: Path) -> None:
    run(["zstd", "-q", f"-{ZSTD_LEVEL}", "--no-progress", "-f", "-o", out, plain])


# ------------------------------------------------------------------ squashfs


def stage(members: Sequence[Member], data: Data, top: Path, *, top_time: int) -> None:
    """The members as a real tree, for mksquashfs: data, modes, owners,
    xattrs and times as they are to be in the image (the top's: `top_time`,
    seconds)."""
    top.mkdir(mode=0o755)
    implied: list[Path] = []  # directories an update passes through unchanged
    made: set[str] = set()  # directories staged so far, by name
    for m in members:
        if not m.name:
            continue  # the top: made above
        path = top / m.name
        implied += _parents(m.name, top, made)
        if m.kind is Kind.DIR:
            path.mkdir()
            made.add(m.name)
        elif m.kind is Kind.FILE:
            with open(path, "xb") as f:
                for chunk in data(m):
                    f.write(chunk)
        elif m.kind is Kind.SYMLINK:
            os.symlink(m.target, path)
        elif m.kind is Kind.HARDLINK:
            os.link(top / m.target, path)
            continue  # its file's metadata is its own
        else:
            raise UsageError(f"{m.name}: a {m.kind}, which mkupdates does not stage")
        _metadata(path, m)
    for m in reversed(members):  # directories' times after what went into them
        if m.kind is Kind.DIR:
            os.utime(top / m.name, ns=(m.mtime_ns, m.mtime_ns))
    for path in [*implied, top]:
        os.utime(path, (top_time, top_time))


def _parents(name: str, top: Path, made: set[str]) -> list[Path]:
    """Make the missing directories above the member `name` (0755, root's,
    as apply makes a directory it has to), and add them to `made`; those
    made.  Only the levels not yet in `made` are looked at: a tree 1,500
    levels deep was 1,500 times its depth in lookups."""
    if posixpath.isabs(name):  # listing.py refuses such names: never staged outside `top`
        raise ValueError(f"{name}: not a relative name")
    missing = []
    parent = posixpath.dirname(name)
    while parent and parent not in made:
        missing.append(parent)
        parent = posixpath.dirname(parent)
    implied = []
    for rel in reversed(missing):
        full = top / rel
        if not full.exists():
            full.mkdir()
            os.chmod(full, 0o755)  # whatever the umask
            implied.append(full)
        made.add(rel)
    return implied


def _metadata(path: Path, m: Member) -> None:
    try:
        if (m.uid, m.gid) != (os.geteuid(), os.getegid()):
            os.lchown(path, m.uid, m.gid)
        if m.kind is not Kind.SYMLINK:
            os.chmod(path, stat.S_IMODE(m.mode))
        for key, value in m.xattrs:
            os.setxattr(path, key, value, follow_symlinks=False)
    except PermissionError as exc:
        raise UsageError(f"{m.name}: cannot stage it for mksquashfs: {exc.strerror}",
                         hint="run as root, or give --all-root (and --no-xattrs for "
                              "security.* or trusted.* xattrs), or use --format "
                              "tar.zst") from None
    os.utime(path, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)


def mksquashfs_argv(tree: Path, image: Path, *, mkfs_time: int, all_root: bool) -> list[str]:
    argv = ["mksquashfs", os.fspath(tree), os.fspath(image), "-noappend", "-no-progress",
            "-quiet", "-comp", SQUASHFS_COMPRESSOR, "-mkfs-time", str(mkfs_time)]
    return argv + (["-all-root"] if all_root else [])


def squashfs(tree: Path, image: Path, *, mkfs_time: int, all_root: bool) -> None:
    run(mksquashfs_argv(tree, image, mkfs_time=mkfs_time, all_root=all_root))
