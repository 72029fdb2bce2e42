"""Reading a tree back, entry by entry, to compare a source with an image."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Meta:
    st_mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    rdev: int
    target: str
    digest: str
    xattrs: tuple[tuple[str, bytes], ...]


def digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    names = os.listxattr(path, follow_symlinks=False)
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def describe(root: Path, *, skip: frozenset[str] = frozenset({"lost+found"})) -> dict[str, Meta]:
    """Every entry below root (root itself as "") with its metadata and content hash."""
    found: dict[str, Meta] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == "":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in [*dirnames, *filenames, ""] if rel_dir == "" else [*dirnames, *filenames]:
            rel = f"{rel_dir}/{name}" if rel_dir and name else (rel_dir or name)
            full = os.path.join(root, rel) if rel else os.fspath(root)
            st = os.lstat(full)
            found[rel] = Meta(
                st_mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                size=st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                rdev=st.st_rdev,
                target=os.readlink(full) if stat.S_ISLNK(st.st_mode) else "",
                digest=digest(full) if stat.S_ISREG(st.st_mode) else "",
                xattrs=_xattrs(full) if not stat.S_ISLNK(st.st_mode) else (),
            )
    return found


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if st.st_nlink > 1:
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(full, root))
    return {frozenset(g) for g in groups.values()}


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def differences(want: dict[str, Meta], got: dict[str, Meta]) -> list[str]:
    out = [f"missing in image: {p}" for p in sorted(want.keys() - got.keys())]
    out += [f"extra in image: {p}" for p in sorted(got.keys() - want.keys())]
    for path in sorted(want.keys() & got.keys()):
        a, b = want[path], got[path]
        for field in Meta.__dataclass_fields__:
            if getattr(a, field) != getattr(b, field):
                out.append(f"{path or '/'}: {field} {getattr(a, field)!r} != {getattr(b, field)!r}")
    return out


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextmanager
def mounted_rootfs(squashfs_img: Path, where: Path) -> Iterator[Path]:
    """Loop-mount squashfs.img and the rootfs.img inside it, read-only (root only)."""
    outer, inner = where / "squashfs", where / "rootfs"
    outer.mkdir()
    inner.mkdir()
    _run("mount", "-t", "squashfs", "-o", "loop,ro", os.fspath(squashfs_img), os.fspath(outer))
    try:
        _run("mount", "-t", "ext4", "-o", "loop,ro,noload", os.fspath(outer / "LiveOS/rootfs.img"),
             os.fspath(inner))
        try:
            yield inner
        finally:
            _run("umount", os.fspath(inner))
    finally:
        _run("umount", os.fspath(outer))
