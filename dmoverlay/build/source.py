"""What a build reads: a directory tree, or a tar archive unpacked into a
private staging tree.  Either way the result is a `Tree`: the directory
mkfs.ext4 -d populates from, and the manifest of what each entry must be."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dmoverlay.core.compress import STREAM_ERRORS, Compression, Readable, open_decompressed
from dmoverlay.core.compress import detect as detect_compression
from dmoverlay.core.entries import FORMAT_BITS, Kind, Member, kind_of
from dmoverlay.core.errors import SourceError
from dmoverlay.core.tarread import TarReader, tar_header_checksum_ok

NAME_MAX = 255
CHUNK = 1 << 20
# A tar header: what tells a tar archive, and more than any compressor's magic.
TAR_BLOCK = 512


SPECIAL = frozenset({Kind.CHAR, Kind.BLOCK, Kind.FIFO, Kind.SOCKET})


@dataclass(frozen=True)
class Entry:
    """One name in the tree.  `path` is relative ("usr/bin/ls"); "" is the root."""

    path: str
    kind: Kind
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0  # bytes of data a regular file occupies (holes excluded)
    target: str = ""  # symlink target
    rdev: tuple[int, int] = (0, 0)
    link_to: str = ""  # for a hardlink: the path that carries the inode
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @property
    def st_mode(self) -> int:
        return FORMAT_BITS[self.kind] | self.mode


@dataclass
class Tree:
    """`root` is what mkfs.ext4 -d reads.  When `staged`, the files under root
    only carry names and data: modes, owners, times, xattrs and special files
    come from the manifest alone."""

    root: Path
    entries: list[Entry]
    staged: bool
    description: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def newest_mtime(self) -> int:
        """Seconds of the newest mtime in the tree: the default build time."""
        return max((e.mtime_ns for e in self.entries), default=0) // 1_000_000_000

    def data_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.kind is Kind.FILE and not e.link_to)


def check_name(path: str, component: str) -> None:
    """Names the image cannot carry.  Any other byte is kept, control
    characters too: mkfs.ext4 -d copies names as they are, and debugfs is
    never given one (debugfs.py)."""
    if len(os.fsencode(component)) > NAME_MAX:
        raise SourceError(f"{path!r}: name longer than {NAME_MAX} bytes",
                          hint="ext4 cannot hold it; rename it in the source")


# ---------------------------------------------------------------- directories


def read_directory(root: Path) -> Tree:
    """The manifest of a directory tree, checked for what would stop mkfs."""
    entries: list[Entry] = []
    inodes: dict[tuple[int, int], str] = {}
    as_root = os.geteuid() == 0
    for path, full, st in _walk(root):
        kind = kind_of(st.st_mode)
        if kind is None:
            raise SourceError(f"{full}: unsupported file type")
        if not as_root:
            _check_readable(full, kind)
        link_to = ""
        if kind is not Kind.DIR and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            link_to = inodes.setdefault(key, path)
            link_to = "" if link_to == path else link_to
        entries.append(Entry(
            path=path,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            size=min(st.st_size, st.st_blocks * 512) if kind is Kind.FILE else 0,
            target=os.readlink(full) if kind is Kind.SYMLINK else "",
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in SPECIAL else (0, 0),
            link_to=link_to,
        ))
    return Tree(root=root, entries=entries, staged=False, description=f"directory {root}")


def _walk(root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    try:
        yield "", os.fspath(root), os.lstat(root)
    except OSError as exc:
        raise SourceError(f"cannot read {root}: {exc.strerror}") from None
    stack = [""]
    while stack:
        rel = stack.pop()
        full_dir = os.path.join(root, rel)
        try:
            with os.scandir(full_dir) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            raise SourceError(f"cannot read directory {full_dir}: {exc.strerror}",
                              hint="run as root, or make the tree readable") from None
        for child in children:
            path = f"{rel}/{child.name}" if rel else child.name
            check_name(path, child.name)
            st = child.stat(follow_symlinks=False)
            yield path, child.path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)


def _check_readable(full: str, kind: Kind) -> None:
    need = {Kind.FILE: os.R_OK, Kind.DIR: os.R_OK | os.X_OK}.get(kind)
    if need is not None and not os.access(full, need, follow_symlinks=False):
        raise SourceError(f"cannot read {full}: permission denied",
                          hint="run as root, or build from a tar archive of the tree")


# ------------------------------------------------------------------- archives


def is_tar(path: Path) -> bool:
    """True for a tar archive, plain or compressed, judged by content."""
    try:
        with open(path, "rb") as raw, open_decompressed(os.fspath(path), raw) as stream:
            head = stream.read(TAR_BLOCK)
    except (SourceError, *STREAM_ERRORS):
        return False
    if len(head) < TAR_BLOCK:
        return False
    if head[257:262] == b"ustar":
        return True
    return tar_header_checksum_ok(head)


def read_tar(archive: Path, staging: Path) -> Tree:
    """Unpack `archive` into `staging` (names and data only; no privilege
    needed) and return the manifest of what each entry must become.  The
    archive is read by apply's reader (tarread), with all its checks."""
    unpacker = _Unpacker(staging)
    with open(archive, "rb") as raw:
        plain = detect_compression(raw.read(TAR_BLOCK)) is Compression.NONE
    reader = TarReader(archive, label=os.fspath(archive), description=f"archive {archive}",
                       in_place=plain)
    for member, data in reader.members():
        unpacker.add(member, data)
    entries = list(unpacker.entries.values())
    return Tree(root=staging, entries=entries, staged=True, description=f"archive {archive}")


def tar_path(name: str) -> str:
    """The member's path inside the tree: leading / and ./ dropped, no `..`."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SourceError(f"{name!r}: member name leaves the tree ('..')",
                          hint="the archive is malformed or hostile")
    path = "/".join(parts)
    for part in parts:
        check_name(name, part)
    return path


class _Unpacker:
    """Creates each member under the staging root.  Every parent it writes
    into is a directory it made itself, so no name can lead outside."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.entries: dict[str, Entry] = {}
        os.makedirs(staging, mode=0o700, exist_ok=False)
        self.entries[""] = Entry("", Kind.DIR, 0o755, 0, 0, 0)

    def add(self, member: Member, data: Readable | None) -> None:
        path = tar_path(member.name)
        entry = self._entry(path, member)
        self._make_parents(path, member.name)
        full = os.path.join(self.staging, path)
        old = self.entries.get(path)
        if old is not None and path:
            if old.kind is Kind.DIR and entry.kind is Kind.DIR:
                self.entries[path] = entry
                return
            if Kind.DIR in (old.kind, entry.kind):
                raise SourceError(f"{member.name!r}: appears as a directory and as a "
                                  f"{entry.kind if old.kind is Kind.DIR else old.kind}",
                                  hint="the archive is malformed")
            os.unlink(full)
        if not path:
            self.entries[""] = entry if entry.kind is Kind.DIR else self.entries[""]
            return
        self._create(full, entry, member, data)
        self.entries[path] = entry

    def _entry(self, path: str, member: Member) -> Entry:
        kind = member.kind
        link_to = ""
        if kind is Kind.HARDLINK:
            link_to = tar_path(member.target)
            first = self.entries.get(link_to)
            if first is None or first.kind is Kind.DIR:
                raise SourceError(f"{member.name!r}: hardlink to {member.target!r}, "
                                  "which is not an earlier file of the archive",
                                  hint="the archive is malformed")
            link_to = first.link_to or link_to
            kind = first.kind
        size = 0
        if kind is Kind.FILE and not link_to:
            size = sum(n for _, n in member.sparse) if member.sparse else member.size
        return Entry(
            path=path,
            kind=kind,
            mode=member.mode,
            uid=member.uid,
            gid=member.gid,
            mtime_ns=member.mtime_ns,
            size=size,
            target=member.target if kind is Kind.SYMLINK else "",
            rdev=member.rdev,
            link_to=link_to,
            xattrs=member.xattrs,
        )

    def _make_parents(self, path: str, name: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(len(parts)):
            parent = "/".join(parts[: i + 1])
            known = self.entries.get(parent)
            if known is None:
                os.mkdir(os.path.join(self.staging, parent), 0o700)
                self.entries[parent] = Entry(parent, Kind.DIR, 0o755, 0, 0, 0)
            elif known.kind is not Kind.DIR:
                raise SourceError(f"{name!r}: goes through {parent!r}, which is a {known.kind}",
                                  hint="the archive is malformed or hostile")

    def _create(self, full: str, entry: Entry, member: Member, data: Readable | None) -> None:
        if entry.link_to:
            os.link(os.path.join(self.staging, entry.link_to), full, follow_symlinks=False)
        elif entry.kind is Kind.DIR:
            os.mkdir(full, 0o700)
        elif entry.kind is Kind.SYMLINK:
            os.symlink(member.target, full)
        elif entry.kind is Kind.FILE:
            assert data is not None
            write_data(full, data, member.size, member.sparse)
        elif entry.kind is Kind.FIFO:
            os.mkfifo(full, 0o600)  # mkfs copies it as a fifo
        else:
            # Device nodes are made in the image itself; here they are only
            # a name (creating them would need privilege).
            os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def write_data(full: str, source: Readable, size: int,
               sparse: tuple[tuple[int, int], ...] | None) -> None:
    """Copy a file's data to a new file: the pieces a sparse member's map
    names (its holes stay holes), or all of it leaving holes where whole
    chunks are zero."""
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        offset = 0
        for start, length in sparse if sparse is not None else ((0, size),):
            _skip(source, start - offset, full)
            _copy_piece(fd, source, start, length, full, holes=sparse is None)
            offset = start + length
        _skip(source, size - offset, full)
        if source.read(1):
            raise SourceError(f"{full}: archive member longer than its header says")
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _chunks(source: Readable, length: int, full: str) -> Iterator[bytes]:
    """The next `length` bytes of a member's data, a chunk at a time; an
    archive that ends before them is one error."""
    while length > 0:
        chunk = source.read(min(CHUNK, length))
        if not chunk:
            raise SourceError(f"{full}: archive member shorter than its header says")
        length -= len(chunk)
        yield chunk


def _skip(source: Readable, length: int, full: str) -> None:
    for _ in _chunks(source, length, full):
        pass


def _copy_piece(fd: int, source: Readable, offset: int, length: int, full: str, *,
                holes: bool) -> None:
    zero = bytes(CHUNK)
    for chunk in _chunks(source, length, full):
        if not (holes and chunk == zero[: len(chunk)]):
            os.pwrite(fd, chunk, offset)
        offset += len(chunk)
