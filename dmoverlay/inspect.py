"""`dmoverlay inspect`: what an image is and what it holds, read without
mounting anything, so that it works as a normal user.

A squashfs is listed with `unsquashfs -lln` and its LiveOS/rootfs.img read
with `unsquashfs -cat` (only the first 4 KiB: the superblock is all we need).
An ext filesystem is asked with `debugfs IMAGE?offset=N` whether it holds
LiveOS/squashfs.img; when the file lies in one run of blocks it is read in
place (`unsquashfs -o`), else copied out with debugfs `dump`.  A disk image's
partitions come from pyparted.  A persistent overlay (dm-snapshot's store,
in a file or a partition) is judged as setup judges it, and its record
names the base it was made over.  Parsing of superblocks lives in
`dmoverlay.core.superblock`; the parsers of tool output here are pure as well."""

from __future__ import annotations

import itertools
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmoverlay.core import debugfs, log, run
from dmoverlay.core.errors import CommandFailed, DebugfsFailed, ImageError
from dmoverlay.core.sizes import format_size
from dmoverlay.core.superblock import (
    EXT_SUPERBLOCK_OFFSET,
    EXT_SUPERBLOCK_SIZE,
    HEAD_SIZE,
    Ext4Info,
    Kind,
    SquashfsInfo,
    detect,
    iso_time,
    parse_ext4,
    parse_squashfs,
)
from dmoverlay.overlay.baseid import RECORD_OFFSET, RECORD_SIZE, BaseIdentity, decode, has_room
from dmoverlay.overlay.dmtable import SECTOR
from dmoverlay.overlay.persistent import STORE_MAGIC, read_header

# dracut's dmsquash-live looks for rootfs.img first, then the older name.
ROOTFS_NAMES = ("LiveOS/rootfs.img", "LiveOS/ext3fs.img")
SQUASHFS_NAME = "LiveOS/squashfs.img"
TOOLS = ("unsquashfs", "debugfs")

_FORMATS_HINT = ("inspect reads a squashfs (squashfs.img), an ext2/3/4 filesystem "
                 "(rootfs.img), a GPT or MBR disk image, or a persistent overlay")
_DAMAGED_HINT = "the image is damaged or truncated: build or copy it again"


# -------------------------------------------------------------------- reports


@dataclass(frozen=True)
class SquashfsReport:
    size: int  # of the file (or region) holding it
    info: SquashfsInfo
    rootfs_path: str | None = None  # LiveOS/rootfs.img or LiveOS/ext3fs.img
    rootfs: Ext4Report | None = None

    @property
    def layout(self) -> str:
        return "liveos" if self.rootfs is not None else "squashfs"

    def to_dict(self) -> dict[str, object]:
        rootfs = None
        if self.rootfs is not None:
            rootfs = {"path": self.rootfs_path, **self.rootfs.to_dict()}
        return {"kind": "squashfs", "size": self.size, **self.info.to_dict(),
                "layout": self.layout, "rootfs": rootfs}


@dataclass(frozen=True)
class Ext4Report:
    size: int  # of the file, partition or squashfs member holding it
    info: Ext4Info
    # Whether LiveOS/squashfs.img was looked for: not inside a squashfs,
    # where only the superblock of the filesystem is read.
    searched: bool = False
    squashfs: SquashfsReport | None = None

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {"kind": "ext", "size": self.size, **self.info.to_dict()}
        if self.searched:
            result["liveos_squashfs"] = None if self.squashfs is None else {
                "path": SQUASHFS_NAME, **self.squashfs.to_dict()}
        return result


@dataclass(frozen=True)
class PartitionReport:
    number: int
    start: int  # bytes from the start of the disk
    size: int
    name: str | None  # GPT partition name
    role: str | None  # MBR: primary, logical or extended
    flags: tuple[str, ...]
    filesystem: str | None
    content: PartitionContent

    def to_dict(self) -> dict[str, object]:
        return {"number": self.number, "start": self.start, "size": self.size,
                "name": self.name, "role": self.role, "flags": list(self.flags),
                "filesystem": self.filesystem,
                "content": None if self.content is None else self.content.to_dict()}


@dataclass(frozen=True)
class DiskReport:
    table: str  # gpt or msdos, as parted names them
    size: int
    sector_size: int
    partitions: tuple[PartitionReport, ...]

    def to_dict(self) -> dict[str, object]:
        return {"kind": "disk", "size": self.size, "table": self.table,
                "sector_size": self.sector_size,
                "partitions": [p.to_dict() for p in self.partitions]}


@dataclass(frozen=True)
class StoreReport:
    """A persistent overlay: dm-snapshot's store, and the base it records."""

    size: int
    chunk_size: int  # bytes
    base: BaseIdentity | None  # None: nothing recorded (dracut made it), or no room
    recordable: bool  # whether its first chunk has room for a record

    def to_dict(self) -> dict[str, object]:
        base = None if self.base is None else {
            "uuid": self.base.uuid, "label": self.base.label,
            "size": self.base.sectors * SECTOR, "digest": self.base.digest.hex()}
        return {"kind": "snapshot-store", "size": self.size, "chunk_size": self.chunk_size,
                "base": base, "recordable": self.recordable}


Content = SquashfsReport | Ext4Report | DiskReport | StoreReport
PartitionContent = Ext4Report | SquashfsReport | StoreReport | None


@dataclass(frozen=True)
class ImageReport:
    path: str
    content: Content

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, **self.content.to_dict()}


# ------------------------------------------------- parsers of tool output (pure)


@dataclass(frozen=True)
class Listed:
    """One line of `unsquashfs -lln`: the type letter of `ls -l` and the size."""

    type: str
    size: int


_LISTING = re.compile(
    r"(?P<mode>[-dlcbps][-rwxsStT]{9})\s+\S+\s+(?P<size>\d+)\s+"
    r"\d{4}-\d\d-\d\d \d\d:\d\d (?P<path>.*)")


def parse_listing(text: str) -> dict[str, Listed]:
    """Paths (without the leading /) of `unsquashfs -lln -d '' IMG`.  Device
    lines (major, minor instead of a size) are left out."""
    entries: dict[str, Listed] = {}
    for line in text.splitlines():
        match = _LISTING.fullmatch(line)
        if match is None:
            continue
        path = match["path"]
        if match["mode"][0] == "l":
            path = path.split(" -> ", 1)[0]
        entries[path.lstrip("/")] = Listed(type=match["mode"][0], size=int(match["size"]))
    return entries


@dataclass(frozen=True)
class BlockRun:
    """Blocks `logical`.. of a file stored at `physical`.. on the filesystem."""

    logical: int
    physical: int
    length: int


@dataclass(frozen=True)
class Stat:
    """What `debugfs -R "stat PATH"` says about a file."""

    type: str  # regular, directory, symlink...
    size: int
    runs: tuple[BlockRun, ...]
    unwritten: bool  # has extents that read as zeros whatever the disk holds


_RUN = re.compile(r"\((?P<logical>[^)]*)\):(?P<physical>\d+)(?:-\d+)?")
_LOGICAL = re.compile(r"(?P<start>\d+)(?:-(?P<end>\d+))?(?P<unwritten>\[u\])?")


def parse_stat(text: str) -> Stat | None:
    """debugfs's stat output; None when it has no inode line."""
    kind = re.search(r"^Inode: \d+\s+Type: (\S+)", text, re.M)
    size = re.search(r"^User:.*\bSize: (\d+)", text, re.M)
    if kind is None or size is None:
        return None
    section = re.search(r"^(?:EXTENTS|BLOCKS):[ \t]*$(?P<body>.*)", text, re.M | re.S)
    blocks = section["body"].split("TOTAL:")[0] if section else ""
    runs: list[BlockRun] = []
    unwritten = False
    for match in _RUN.finditer(blocks):
        logical = _LOGICAL.fullmatch(match["logical"])
        if logical is None:  # an index block (ETB0, IND, DIND...), not data
            continue
        unwritten = unwritten or bool(logical["unwritten"])
        first = int(logical["start"])
        length = int(logical["end"] or first) - first + 1
        runs.append(BlockRun(logical=first, physical=int(match["physical"]), length=length))
    return Stat(type=kind[1], size=int(size[1]), runs=tuple(runs), unwritten=unwritten)


def contiguous_start(s: Stat, *, block_size: int, fs_blocks: int) -> int | None:
    """The first block of a file that lies in one run of blocks, so that it
    can be read in place; None when it is fragmented, sparse or unwritten."""
    if s.unwritten or not s.runs or s.size == 0:
        return None
    runs = sorted(s.runs, key=lambda r: r.logical)
    first = runs[0]
    if first.logical != 0:
        return None
    for before, after in itertools.pairwise(runs):
        if (after.logical != before.logical + before.length
                or after.physical != before.physical + before.length):
            return None
    blocks = runs[-1].logical + runs[-1].length
    if blocks * block_size < s.size or first.physical + blocks > fs_blocks:
        return None
    return first.physical


# ------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Region:
    """Bytes `offset`..`offset + size` of a file on this machine, and how to
    name them in messages ("disk.img partition 1: LiveOS/squashfs.img")."""

    path: str
    offset: int
    size: int
    where: str


class _Scratch:
    """Names for copies in the private temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._count = itertools.count(1)

    def new(self, stem: str) -> Path:
        return self.root / f"{stem}-{next(self._count)}"


def inspect_image(image: str | os.PathLike[str]) -> ImageReport:
    """Report what `image` is: a squashfs, an ext2/3/4 filesystem or a disk
    image, and what each holds down to the root filesystem."""
    name = os.fspath(image)
    size = image_size(name)
    run.require_tools(*TOOLS)
    with tempfile.TemporaryDirectory(prefix="dmoverlay-inspect-") as tmp:
        scratch = _Scratch(Path(tmp))
        path = os.path.abspath(name)
        if "?" in path:  # debugfs would take what follows for options
            link = scratch.new("image")
            link.symlink_to(path)
            path = os.fspath(link)
        region = Region(path=path, offset=0, size=size, where=name)
        head = read_bytes(region, 0, HEAD_SIZE)
        kind = detect(head)
        content: Content
        if head[:4] == STORE_MAGIC:
            content = _store(region, head)
        elif kind is Kind.SQUASHFS:
            content = _squashfs(region, head)
        elif kind is Kind.EXT:
            content = _ext(region, head, scratch)
        elif kind in (Kind.GPT, Kind.MBR):
            content = _disk(region, scratch)
        else:
            raise ImageError(f"{name} is not a squashfs, ext4 or disk image", hint=_FORMATS_HINT)
    return ImageReport(path=name, content=content)


def image_size(name: str) -> int:
    """The size of a file or block device we can read, or one clear error."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", hint="check the path") from None
    except OSError as exc:
        raise ImageError(f"cannot reach {name}: {exc.strerror}",
                         hint="check the path and the permissions of its directories"
                         ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name} is a directory, not an image",
                         hint="give the image file, e.g. LiveOS/squashfs.img")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"{name} is not a regular file or a block device", hint=_FORMATS_HINT)
    try:
        with open(name, "rb") as f:
            size = f.seek(0, os.SEEK_END)
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror}",
                         hint="inspect only reads the image: check its permissions") from None
    if size == 0:
        raise ImageError(f"{name} is empty", hint=_FORMATS_HINT)
    return size


def read_bytes(region: Region, offset: int, length: int) -> bytes:
    length = max(0, min(length, region.size - offset))
    try:
        with open(region.path, "rb") as f:
            f.seek(region.offset + offset)
            return f.read(length)
    except OSError as exc:
        raise ImageError(f"cannot read {region.where}: {exc.strerror}",
                         hint="inspect only reads the image: check its permissions") from None


@contextmanager
def _about(where: str) -> Iterator[None]:
    """Say which image, partition or member a parser's complaint is about."""
    try:
        yield
    except ImageError as exc:
        raise ImageError(f"{where}: {exc.message}", hint=exc.hint) from None


def _ext_superblock(head: bytes) -> bytes:
    return head[EXT_SUPERBLOCK_OFFSET:EXT_SUPERBLOCK_OFFSET + EXT_SUPERBLOCK_SIZE]


# ------------------------------------------------------------------- squashfs


def _squashfs(region: Region, head: bytes) -> SquashfsReport:
    with _about(region.where):
        info = parse_squashfs(head, size=region.size)
    listing = _unsquashfs(region, ["-lln", "-d", "", region.path, *ROOTFS_NAMES]).stdout
    entries = parse_listing(listing)
    member = next((n for n in ROOTFS_NAMES if n in entries), None)
    if member is None:
        return SquashfsReport(size=region.size, info=info)
    where = f"{region.where}: {member}"
    entry = entries[member]
    if entry.type != "-":
        raise ImageError(f"{where} is not a regular file",
                         hint="dracut's dmsquash-live loop-mounts it: it must be a file")
    rootfs_head = _unsquashfs_head(region, member)
    if detect(rootfs_head) is not Kind.EXT:
        raise ImageError(f"{where} is not an ext2/3/4 filesystem",
                         hint="dracut's dmsquash-live mounts it as the root: make it with "
                              "mkfs.ext4 (dmoverlay build does)")
    with _about(where):
        rootfs = parse_ext4(_ext_superblock(rootfs_head), size=entry.size)
    return SquashfsReport(size=region.size, info=info, rootfs_path=member,
                          rootfs=Ext4Report(size=entry.size, info=rootfs))


def _offset_args(region: Region) -> list[str]:
    return ["-o", str(region.offset)] if region.offset else []


def _unsquashfs(region: Region, args: list[str]) -> run.Result:
    try:
        return run.run(["unsquashfs", *_offset_args(region), *args])
    except CommandFailed as exc:
        raise ImageError(f"{region.where}: unsquashfs cannot read it ({exc.message})",
                         hint=_DAMAGED_HINT) from None


def _unsquashfs_head(region: Region, member: str) -> bytes:
    argv = ["unsquashfs", *_offset_args(region), "-cat", region.path, member]
    try:
        return run.run_head(argv, HEAD_SIZE)
    except CommandFailed as exc:
        raise ImageError(f"{region.where}: unsquashfs cannot read {member} ({exc.message})",
                         hint=_DAMAGED_HINT) from None


# ------------------------------------------------------------------------ ext


def _ext(region: Region, head: bytes, scratch: _Scratch) -> Ext4Report:
    with _about(region.where):
        info = parse_ext4(_ext_superblock(head), size=region.size)
    found = _debugfs_stat(region, SQUASHFS_NAME)
    if found is None:
        return Ext4Report(size=region.size, info=info, searched=True)
    where = f"{region.where}: {SQUASHFS_NAME}"
    if found.type != "regular":
        raise ImageError(f"{where} is a {found.type}, not a regular file",
                         hint="dracut's dmsquash-live loop-mounts it: it must be a file")
    inner = _member_region(region, info, found, where, scratch)
    squashfs = _squashfs(inner, read_bytes(inner, 0, HEAD_SIZE))
    return Ext4Report(size=region.size, info=info, searched=True, squashfs=squashfs)


def _debugfs(region: Region, *words: bytes) -> str:
    """One debugfs request on the region; a complaint of debugfs's other
    than "not found" is the image's damage."""
    try:
        return debugfs.request(region.path, *words, offset=region.offset)
    except DebugfsFailed as exc:
        raise ImageError(f"{region.where}: debugfs cannot read it ({exc.problem})",
                         hint=_DAMAGED_HINT) from None


def _debugfs_stat(region: Region, member: str) -> Stat | None:
    return parse_stat(_debugfs(region, b"stat", debugfs.argument("/" + member)))


def _member_region(region: Region, info: Ext4Info, found: Stat, where: str,
                   scratch: _Scratch) -> Region:
    """Where the bytes of a file in an ext filesystem can be read: in place
    when they are contiguous, else from a copy in the scratch directory."""
    start = contiguous_start(found, block_size=info.block_size, fs_blocks=info.blocks)
    if start is not None:
        return Region(path=region.path, offset=region.offset + start * info.block_size,
                      size=found.size, where=where)
    copy = scratch.new("squashfs")
    with log.step(f"Copying {where} ({format_size(found.size)}, not contiguous on disk)"):
        _debugfs(region, b"dump", debugfs.argument("/" + SQUASHFS_NAME),
                 debugfs.argument(os.fspath(copy)))
    if not copy.exists() or copy.stat().st_size != found.size:
        raise ImageError(f"{where}: debugfs could not copy it out", hint=_DAMAGED_HINT)
    return Region(path=os.fspath(copy), offset=0, size=found.size, where=where)


# ---------------------------------------------------------------------- disks


def _disk(region: Region, scratch: _Scratch) -> DiskReport:
    # pyparted, not sfdisk as setup uses: the report names each partition's name and type
    import parted  # only disk images need libparted

    errors = (parted.DiskException, parted.DiskLabelException, parted.IOException,
              parted.DeviceException, parted.PartitionException, parted.PartedException,
              parted.UnknownDeviceException, parted.GeometryException)
    try:
        device = parted.getDevice(region.path)
        disk = parted.newDisk(device)
    except errors as exc:
        raise ImageError(f"{region.where}: cannot read its partition table ({exc})",
                         hint=_DAMAGED_HINT) from None
    if disk.type not in ("gpt", "msdos"):
        raise ImageError(f"{region.where}: parted reads a {disk.type!r} label, not a GPT or "
                         "MBR partition table", hint=_FORMATS_HINT)
    named = disk.supportsFeature(parted.DISK_TYPE_PARTITION_NAME)
    partitions = tuple(
        _partition(region, part, sector=device.sectorSize, named=named,
                   msdos=disk.type == "msdos", scratch=scratch)
        for part in sorted(disk.partitions, key=lambda p: p.number))
    return DiskReport(table=disk.type, size=region.size, sector_size=device.sectorSize,
                      partitions=partitions)


def _partition(disk: Region, p: Any, *, sector: int, named: bool, msdos: bool,
               scratch: _Scratch) -> PartitionReport:
    """One of pyparted's partitions (`p`), and what it holds."""
    import parted

    number = int(p.number)
    start = int(p.geometry.start) * sector
    size = int(p.geometry.length) * sector
    where = f"{disk.where} partition {number}"
    role = None
    if msdos:
        role = ("extended" if p.type & parted.PARTITION_EXTENDED
                else "logical" if p.type & parted.PARTITION_LOGICAL else "primary")
    region = Region(path=disk.path, offset=start, size=size, where=where)
    content = None if role == "extended" else _partition_content(region, scratch)
    filesystem = _filesystem_name(content) or (p.fileSystem.type if p.fileSystem else None)
    flags = tuple(f for f in p.getFlagsAsString().split(", ") if f)
    return PartitionReport(number=number, start=start, size=size,
                           name=(p.name or None) if named else None, role=role,
                           flags=flags, filesystem=filesystem, content=content)


def _partition_content(region: Region, scratch: _Scratch) -> PartitionContent:
    head = read_bytes(region, 0, HEAD_SIZE)
    kind = detect(head)
    if head[:4] == STORE_MAGIC:  # a persistent overlay on a raw partition
        return _store(region, head)
    if kind is Kind.EXT:
        return _ext(region, head, scratch)
    if kind is Kind.SQUASHFS:
        return _squashfs(region, head)
    return None  # swap, FAT, ...: parted names them


def _filesystem_name(content: PartitionContent) -> str | None:
    if isinstance(content, Ext4Report):
        return content.info.fs_type
    if isinstance(content, SquashfsReport):
        return "squashfs"
    if isinstance(content, StoreReport):
        return "snapshot store"
    return None


# ------------------------------------------------------- persistent overlays


def _store(region: Region, head: bytes) -> StoreReport:
    """A store's header and the record of its base (dmoverlay.overlay.baseid),
    each judged as setup judges them: a store the kernel gave up on, or a
    damaged record, is one error line."""
    with _about(region.where):
        header = read_header(head, where="the snapshot store")
        recordable = has_room(header.chunk_sectors)
        base = None
        if recordable:
            first = read_bytes(region, 0, RECORD_OFFSET + RECORD_SIZE)
            base = decode(first, where="the snapshot store")
    return StoreReport(size=region.size, chunk_size=header.chunk_sectors * SECTOR,
                       base=base, recordable=recordable)


# ------------------------------------------------------------------ as text


def format_report(report: ImageReport) -> list[str]:
    """The report as an indented tree of facts, for people."""
    return [f"{report.path}: {_headline(report.content)}", *_indent(_facts(report.content))]


def _headline(content: Content) -> str:
    if isinstance(content, SquashfsReport):
        layout = "LiveOS layout" if content.rootfs else "plain, no LiveOS/rootfs.img"
        return f"squashfs {content.info.version}, {content.info.compression}, {layout}"
    if isinstance(content, Ext4Report):
        return f"{content.info.fs_type} filesystem"
    if isinstance(content, StoreReport):
        return "persistent overlay (dm-snapshot store)"
    count = len(content.partitions)
    return f"{content.table} disk image, {count} partition{'s' if count != 1 else ''}"


def _facts(content: Content) -> list[str]:
    if isinstance(content, SquashfsReport):
        return _squashfs_facts(content)
    if isinstance(content, Ext4Report):
        return _ext_facts(content)
    if isinstance(content, StoreReport):
        return _store_facts(content)
    return _disk_facts(content)


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _squashfs_facts(r: SquashfsReport) -> list[str]:
    i = r.info
    lines = [
        f"size: {format_size(i.bytes_used)} used of {format_size(r.size)}",
        f"compression: {i.compression}",
        f"block size: {format_size(i.block_size)}",
        f"inodes: {i.inodes}",
        f"created: {iso_time(i.mkfs_time)}",
        f"flags: {', '.join(i.flags) or 'none'}",
        f"layout: {r.layout}",
    ]
    if r.rootfs is not None:
        lines.append(f"{r.rootfs_path}: {format_size(r.rootfs.size)}")
        lines += _indent(_ext_facts(r.rootfs))
    return lines


def _ext_facts(r: Ext4Report) -> list[str]:
    i = r.info
    lines = [
        f"type: {i.fs_type}",
        f"label: {i.label or '(none)'}",
        f"uuid: {i.uuid}",
        f"block size: {format_size(i.block_size)}",
        f"size: {format_size(i.size)} ({i.blocks} blocks)",
        f"free: {format_size(i.free)} ({i.free_blocks} blocks)",
        f"inodes: {i.inodes} ({i.free_inodes} free)",
        f"files: {i.files} (inodes in use, less the {i.reserved_inodes} reserved; "
        "directories and lost+found count, hard links once)",
        f"features: {' '.join(i.features)}",
        f"state: {i.state}",
        f"created: {iso_time(i.mkfs_time) or 'unknown'}",
        f"last mounted: {iso_time(i.last_mount_time) or 'never'}",
        f"last written: {iso_time(i.last_write_time) or 'never'}",
    ]
    if r.searched and r.squashfs is None:
        lines.append(f"{SQUASHFS_NAME}: none")
    elif r.squashfs is not None:
        lines.append(f"{SQUASHFS_NAME}: {format_size(r.squashfs.size)}, {_headline(r.squashfs)}")
        lines += _indent(_squashfs_facts(r.squashfs))
    return lines


def _disk_facts(r: DiskReport) -> list[str]:
    lines = [f"table: {r.table}", f"size: {format_size(r.size)}"]
    for p in r.partitions:
        described = [f"starts at {format_size(p.start)} ({p.start} bytes)",
                     f"size {format_size(p.size)}"]
        if p.name:
            described.insert(0, repr(p.name))
        if p.role:
            described.append(p.role)
        described.append(p.filesystem or "no filesystem found")
        if p.flags:
            described.append("flags: " + " ".join(p.flags))
        lines.append(f"partition {p.number}: {', '.join(described)}")
        if isinstance(p.content, SquashfsReport):
            lines += _indent(_squashfs_facts(p.content))
        elif isinstance(p.content, Ext4Report):
            lines += _indent(_ext_facts(p.content))
        elif isinstance(p.content, StoreReport):
            lines += _indent(_store_facts(p.content))
    return lines


def _store_facts(r: StoreReport) -> list[str]:
    lines = [f"size: {format_size(r.size)}", f"chunk size: {format_size(r.chunk_size)}"]
    if r.base is not None:
        lines.append(f"made over: {r.base.describe()}")
        lines.append(f"base digest: {r.base.digest.hex()}")
    elif r.recordable:
        lines.append("made over: not recorded (made by dracut, or not used by dmoverlay yet)")
    else:
        lines.append("made over: not recordable (chunks of one sector)")
    return lines
