"""What the reader tests share: updates made in every format and
compression, and what must agree whatever the update came in."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from dmoverlay.apply.readers import open_update
from dmoverlay.apply.readers.directory import DirectoryReader
from dmoverlay.core.entries import Kind, Member, UpdateReader

COMPRESSORS: dict[str, list[str]] = {
    "none": [],
    "gzip": ["gzip", "-9", "-c"],
    "xz": ["xz", "-c"],
    "bzip2": ["bzip2", "-c"],
    "zstd": ["zstd", "-q", "-c"],
}

Read = list[tuple[Member, bytes | None]]


def read_all(reader: UpdateReader) -> Read:
    return [(m, None if d is None else d.read()) for m, d in reader.members()]


def read_spec(spec: str | Path, staging: Path, *, sha256: str | None = None) -> Read:
    with open_update(str(spec), staging=staging, sha256=sha256) as reader:
        return read_all(reader)


Shape = tuple[frozenset[tuple[object, ...]], frozenset[frozenset[str]]]


def shape(got: Read, *, owners: bool = True) -> Shape:
    """What must agree whatever the update came in: hardlink groups are
    compared as groups, since formats differ in which name carries the data."""
    files = {m.name: m for m, _ in got}
    data = {m.name: d for m, d in got if m.kind is Kind.FILE}
    groups: dict[str, set[str]] = {}
    for m, _ in got:
        if m.kind is Kind.HARDLINK:
            groups.setdefault(m.target, {m.target}).add(m.name)
    rows = set()
    for m, _ in got:
        inode = files[m.target] if m.kind is Kind.HARDLINK else m
        content = data.get(inode.name) if inode.kind is Kind.FILE else None
        row: tuple[object, ...] = (m.name, inode.kind, m.mode, inode.size, inode.rdev,
                                   m.target if m.kind is Kind.SYMLINK else "")
        if owners:
            row += (m.uid, m.gid)
        rows.add((*row, hashlib.sha256(content).hexdigest() if content is not None else ""))
    return frozenset(rows), frozenset(frozenset(g) for g in groups.values())


def compress(path: Path, how: str) -> Path:
    if how == "none":
        return path
    out = path.with_name(f"{path.name}.{how}")
    with open(path, "rb") as src, open(out, "wb") as dst:
        subprocess.run(COMPRESSORS[how], stdin=src, stdout=dst, check=True)
    return out


def walk_order(root: Path) -> list[str]:
    """The directory reader's order, as `find` would print it for cpio."""
    reader = DirectoryReader(root, description="")
    return ["." if not m.name else f"./{m.name}" for m, _ in reader.members()]


def make_cpio(root: Path, out: Path, *args: str) -> Path:
    names = "\n".join(walk_order(root)).encode() + b"\n"
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "--quiet", *(args or ("-H", "newc"))], cwd=root,
                       input=names, stdout=f, check=True)
    return out


def make_tar(root: Path, out: Path, *args: str, fmt: str = "posix") -> Path:
    xattrs = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    subprocess.run(["tar", "--create", f"--format={fmt}", "--sort=name", "--numeric-owner",
                    *xattrs, *args, "-f", str(out), "-C", str(root), "."], check=True)
    return out


def small_tree(root: Path) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(os.urandom(300_000))  # incompressible: spans blocks
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    (root / "etc").mkdir()
    (root / "etc/conf").write_bytes(b"key=value\n" * 1000)
    (root / "etc/empty").write_bytes(b"")
    os.chmod(root / "etc/conf", 0o600)
    os.setxattr(root / "etc/conf", "user.note", b"\x00binary\xff")
    os.utime(root / "etc/conf", ns=(0, 1_600_000_000_123_456_789))
    os.symlink("usr/bin", root / "bin")
    os.symlink("/does/not/exist", root / "dangling")
    (root / "var/log").mkdir(parents=True)
    return root



def compress_bytes(data: bytes, how: str) -> bytes:
    return subprocess.run(COMPRESSORS[how], input=data, capture_output=True,
                          check=True).stdout
