"""Trees made from specs, and what a tree is entry by entry, for the
mkupdates tests: type, mode, owner, content, link target, xattrs, and which
names share an inode."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

JOURNAL_TOP = ".dmoverlay"


@dataclass(frozen=True)
class Node:
    kind: str  # "dir", "file", "link"
    mode: int = 0o644
    uid: int = 0
    data: bytes = b""  # file: content; link: target
    xattrs: tuple[tuple[str, bytes], ...] = ()
    group: int = 0  # files of one non-zero group are hardlinks of the first


Spec = dict[str, Node]  # path -> node; parents listed before children


def build(top: Path, spec: Spec) -> None:
    top.mkdir()
    firsts: dict[int, Path] = {}
    for name, node in spec.items():
        path = top / name
        if node.kind == "dir":
            path.mkdir()
        elif node.kind == "link":
            os.symlink(node.data, path)
            os.lchown(path, node.uid, node.uid)
            continue
        elif node.group and node.group in firsts:
            os.link(firsts[node.group], path)
            continue
        else:
            path.write_bytes(node.data)
            firsts.setdefault(node.group, path) if node.group else None
        os.chown(path, node.uid, node.uid)
        os.chmod(path, node.mode)
        for key, value in node.xattrs:
            os.setxattr(path, key, value)


@dataclass(frozen=True)
class Seen:
    kind: str
    mode: int
    uid: int
    gid: int
    data: str  # content hash or link target
    xattrs: tuple[tuple[str, bytes], ...]


def snapshot(top: Path) -> tuple[dict[str, Seen], set[frozenset[str]]]:
    """Every entry below `top` (the journal left out), and the hardlink
    groups of its files (names sharing an inode)."""
    found: dict[str, Seen] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == top and JOURNAL_TOP in dirnames:
            dirnames.remove(JOURNAL_TOP)
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                kind, data = "link", os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                kind, data = "file", hashlib.sha256(Path(full).read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, set()).add(rel)
            else:
                kind, data = ("dir" if stat.S_ISDIR(st.st_mode) else "other"), ""
            xattrs = tuple(sorted((k, os.getxattr(full, k, follow_symlinks=False))
                                  for k in os.listxattr(full, follow_symlinks=False)))
            found[rel] = Seen(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, data, xattrs)
    return found, {frozenset(names) for names in inodes.values()}
