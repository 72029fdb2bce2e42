"""Roots, updates and snapshots for the apply tests."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dmoverlay.apply.execute import ApplyOptions, Result, Spool, apply_members
from dmoverlay.core.entries import Kind, Member

JOURNAL_TOP = ".dmoverlay"


@dataclass(frozen=True)
class Item:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    data: str  # content hash, or link target
    xattrs: tuple[tuple[str, bytes], ...]
    ino_group: int = 0


def snapshot(top: Path, *, times: bool = True) -> dict[str, Item]:
    """Everything below `top` (not following links), the journal left out."""
    found: dict[str, Item] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == top and JOURNAL_TOP in dirnames:
            dirnames.remove(JOURNAL_TOP)
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                data, kind = os.readlink(full), "link"
            elif stat.S_ISREG(st.st_mode):
                data, kind = hashlib.sha256(Path(full).read_bytes()).hexdigest(), "file"
            else:
                data, kind = "", "dir" if stat.S_ISDIR(st.st_mode) else "other"
            xattrs = () if kind == "link" else tuple(sorted(
                (k, os.getxattr(full, k, follow_symlinks=False))
                for k in os.listxattr(full, follow_symlinks=False)))
            found[os.path.relpath(full, top)] = Item(
                kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_mtime_ns if times else 0, data, xattrs)
    return found


def make_root(top: Path) -> tuple[Path, Path]:
    """A live root in the usrmerge style, and a separate live /run."""
    root, run = top / "root", top / "run"
    for d in ("usr/lib", "usr/bin", "etc", "var/log", "run", "tmp", "proc", "dev", "sys"):
        (root / d).mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    os.symlink("/usr/bin", root / "bin")
    os.symlink("/usr/lib", root / "lib64")
    (root / "usr/lib/libfoo.so").write_bytes(b"old libfoo\n")
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho old\n")
    os.chmod(root / "usr/bin/tool", 0o755)
    (root / "etc/os-release").write_text("ID=old\n")
    (root / "etc/keep.d").mkdir()
    (root / "etc/keep.d/a.conf").write_text("a\n")
    os.symlink("/run/resolv.conf", root / "etc/resolv.conf")
    os.chmod(root / "var/log", 0o2750)
    run.mkdir()
    (run / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    for tree in (root, run):
        fix_times(tree)
    return root, run


def fix_times(top: Path, ns: int = 1_400_000_000 * 10**9) -> None:
    """Give every entry the same time, children before their directories."""
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(top, ns=(ns, ns))


def f(name: str, data: bytes = b"new\n", mode: int = 0o644, **kw: object) -> tuple[Member, bytes]:
    return Member(name, Kind.FILE, mode, size=len(data), mtime_ns=1_600_000_000 * 10**9,
                  **kw), data  # type: ignore[arg-type]


def d(name: str, mode: int = 0o755) -> tuple[Member, bytes]:
    return Member(name, Kind.DIR, mode, mtime_ns=1_500_000_000 * 10**9), b""


def link(name: str, target: str) -> tuple[Member, bytes]:
    return Member(name, Kind.SYMLINK, 0o777, target=target), b""


def hard(name: str, target: str) -> tuple[Member, bytes]:
    return Member(name, Kind.HARDLINK, 0o644, target=target), b""


def other(name: str, kind: Kind) -> tuple[Member, bytes]:
    return Member(name, kind, 0o644), b""


def apply(top: Path, root: Path, run: Path | None,
          entries: list[tuple[Member, bytes]], *,
          cow_free: Callable[[str], int | None] = lambda _: None, **opts: object) -> Result:
    spool = Spool(top)
    try:
        for member, data in entries:
            if member.kind is Kind.FILE:
                spool.add(member.name, io.BytesIO(data), len(data))
        return apply_members(ApplyOptions(root, run, **opts),  # type: ignore[arg-type]
                             [m for m, _ in entries], spool, cow_free)
    finally:
        spool.close()


def without_dir_times(snap: dict[str, Item]) -> dict[str, Item]:
    """Existing directories take the time of whatever changed them last."""
    return {p: (replace(i, mtime_ns=0) if i.kind == "dir" else i) for p, i in snap.items()}
