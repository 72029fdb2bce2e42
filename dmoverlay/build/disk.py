"""disk.img: a GPT disk image to write to a USB stick or attach to a VM.

Partition 1 holds an ext4 filesystem with <live_dir>/squashfs.img, which
dracut's dmsquash-live finds with root=live:LABEL=<label> (or PARTLABEL=)
and rd.live.dir=<live_dir>.  Optional partition 2 is a raw persistent COW
for the snapshot overlay: no filesystem, and its first 64 KiB zero, which
dm-snapshot reads as a new, empty store.

Made without privilege or loop devices: pyparted writes the GPT into a
sparse regular file, mke2fs builds the filesystem in place at its byte
offset and debugfs copies the squashfs in.  Every identifier (disk and
partition GUIDs, ext4 UUID and hash seed) derives from the squashfs's
sha256 and the options, so the same inputs give the same bytes.  Planning
and the GPT rewrite are pure."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dmoverlay.build import ext4
from dmoverlay.core import debugfs
from dmoverlay.core.errors import ImageError, UsageError
from dmoverlay.core.log import info, step
from dmoverlay.core.run import require_tools, run
from dmoverlay.core.sizes import KiB, MiB, format_size, round_up
from dmoverlay.core.tree import discard_tree

SECTOR = 512
ALIGN = MiB
# The backup GPT at the end: 32 sectors of entries (128 x 128 bytes) and its header.
BACKUP_GPT = 33 * SECTOR
# What dracut's rd.live.overlay.reset zeroes: dm-snapshot reads a zero
# header as a new store.
OVERLAY_ZEROED = 64 * KiB
MIN_OVERLAY = MiB
SQUASHFS_IMG = "squashfs.img"
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
# Names the identifiers of a disk image derive under.
GUID_NAMESPACE = uuid.UUID("3f0c2a52-9d4b-4c1e-8b7a-5e2d6f1a9c40")

# A label becomes /dev/disk/by-label/<label> and by-partlabel/<label>: udev
# escapes anything outside this set (a space becomes \x20) while dracut
# escapes only "/", and the kernel command line splits on spaces.  ext4
# labels hold at most 16 bytes; GPT names 36 characters, so "<label>-overlay"
# always fits.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")
_DIR_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes from the start of the disk, a multiple of ALIGN
    size: int  # bytes, a multiple of ALIGN
    name: str  # GPT partition name: PARTLABEL=
    uuid: str  # GPT unique partition GUID: PARTUUID=
    type_guid: str
    filesystem: str | None  # None: raw (the overlay's COW)
    fs_label: str | None = None
    fs_uuid: str | None = None

    @property
    def first_lba(self) -> int:
        return self.start // SECTOR

    @property
    def last_lba(self) -> int:
        return (self.start + self.size) // SECTOR - 1

    @property
    def end(self) -> int:
        return self.start + self.size

    def to_dict(self) -> dict[str, object]:
        return {
            "number": self.number, "start": self.start, "size": self.size, "name": self.name,
            "uuid": self.uuid, "type": self.type_guid, "filesystem": self.filesystem,
            "fs_label": self.fs_label, "fs_uuid": self.fs_uuid,
        }


@dataclass(frozen=True)
class DiskLayout:
    size: int  # bytes of the whole image
    uuid: str  # GPT disk GUID
    label: str
    live_dir: str
    partitions: tuple[Partition, ...]

    @property
    def live(self) -> Partition:
        return self.partitions[0]

    @property
    def overlay(self) -> Partition | None:
        return self.partitions[1] if len(self.partitions) > 1 else None

    @property
    def kernel_args(self) -> str:
        """What dracut's dmsquash-live needs to find the runtime on this disk."""
        return f"root=live:LABEL={self.label} rd.live.dir={self.live_dir}"

    def to_dict(self) -> dict[str, object]:
        return {
            "size": self.size, "uuid": self.uuid, "label": self.label,
            "live_dir": self.live_dir, "kernel_args": self.kernel_args,
            "partitions": [p.to_dict() for p in self.partitions],
        }


# ------------------------------------------------------------------ options


def check_label(label: str) -> None:
    if not _LABEL.fullmatch(label):
        raise UsageError(
            f"disk label {label!r} cannot be used",
            hint="use 1 to 16 letters, digits, '.', '_' or '-', starting with a letter or "
                 "digit: it is the ext4 label and the GPT name dracut finds the disk by")


def check_live_dir(live_dir: str) -> None:
    parts = live_dir.split("/")
    if not all(_DIR_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise UsageError(
            f"live directory {live_dir!r} cannot be used",
            hint="give a relative path of letters, digits, '.', '_' or '-', e.g. LiveOS "
                 "(it goes on the kernel command line as rd.live.dir=)")


def check_overlay_size(overlay_size: int | None) -> None:
    if overlay_size is not None and overlay_size < MIN_OVERLAY:
        raise UsageError(
            f"overlay size {overlay_size} bytes is too small for a persistent overlay",
            hint=f"give at least {format_size(MIN_OVERLAY)}, e.g. 2G, or no overlay at all")


def check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise UsageError(f"build time {epoch} is before 1970",
                         hint="set SOURCE_DATE_EPOCH to seconds since 1970")


# ----------------------------------------------------- the live partition's ext4

BLOCK = ext4.BLOCK
EXTENT_BLOCKS = 32768  # the most one extent maps
EXTENTS_PER_BLOCK = (BLOCK - 12) // 12
# A few spare inodes: the partition holds one file, but people add notes.
MIN_INODES = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def live_inodes(blocks: int) -> int:
    """The inode count for `mke2fs -N`: whole inode-table blocks in every group."""
    return ext4.inode_count(blocks, MIN_INODES)


def fs_overhead_blocks(blocks: int) -> int:
    """Blocks mke2fs (with dmoverlay/mke2fs.conf) takes for itself in the
    live partition's filesystem of `blocks`."""
    return ext4.overhead_blocks(blocks, live_inodes(blocks))


def live_content_blocks(squashfs_size: int, *, live_dir: str) -> int:
    """Blocks the squashfs file and the directories holding it take."""
    data = _ceil_div(squashfs_size, BLOCK)
    # An extent breaks at most at its 32768-block limit and once per group
    # (backup superblocks); past 4 extents the inode needs index blocks.
    extents = 2 * (data // EXTENT_BLOCKS + 1)
    index = _ceil_div(extents, EXTENTS_PER_BLOCK) + 1 if extents > 4 else 0
    return data + index + len(live_dir.split("/"))


def live_partition_size(squashfs_size: int, *, live_dir: str) -> int:
    """The live partition: the content, mke2fs's own blocks, and a margin of
    1 % (at least 1 MiB) for what the estimates round away."""
    content = live_content_blocks(squashfs_size, live_dir=live_dir)
    margin = max(MiB // BLOCK, content // 100)
    align = ALIGN // BLOCK
    blocks = round_up(content + margin, align)
    # The overhead grows with the size (journal, groups): settle on a size
    # that holds the content, its margin and its own overhead.
    while (need := content + margin + fs_overhead_blocks(blocks)) > blocks:
        blocks = round_up(need, align)
    return blocks * BLOCK


# ------------------------------------------------------------------ the plan


def identity_seed(squashfs_sha256: str, *, label: str, live_dir: str,
                  overlay_size: int | None, epoch: int) -> str:
    """What every identifier of the disk derives from: the same squashfs and
    options give the same GUIDs, anything else gives new ones."""
    text = f"{squashfs_sha256}\0{label}\0{live_dir}\0{overlay_size}\0{epoch}"
    return hashlib.sha256(text.encode()).hexdigest()


def derived_id(seed: str, what: str) -> str:
    return str(uuid.uuid5(GUID_NAMESPACE, f"{seed}:{what}"))


def plan(*, squashfs_size: int, label: str, live_dir: str, overlay_size: int | None,
         seed: str) -> DiskLayout:
    """Where everything goes.  The overlay size is rounded up to whole MiB."""
    check_label(label)
    check_live_dir(live_dir)
    check_overlay_size(overlay_size)
    live = Partition(
        number=1, start=ALIGN, size=live_partition_size(squashfs_size, live_dir=live_dir),
        # Named after the label, so PARTLABEL= and LABEL= name the same thing.
        name=label, uuid=derived_id(seed, "partition-1"), type_guid=str(LINUX_DATA),
        filesystem="ext4", fs_label=label, fs_uuid=derived_id(seed, "ext4"))
    partitions = [live]
    if overlay_size is not None:
        partitions.append(Partition(
            number=2, start=live.end, size=round_up(overlay_size, ALIGN),
            name=f"{label}-overlay", uuid=derived_id(seed, "partition-2"),
            type_guid=str(LINUX_DATA), filesystem=None))
    size = round_up(partitions[-1].end + BACKUP_GPT, ALIGN)
    return DiskLayout(size=size, uuid=derived_id(seed, "disk"), label=label,
                      live_dir=live_dir, partitions=tuple(partitions))


def live_fs(layout: DiskLayout, *, epoch: int) -> ext4.Ext4Plan:
    live = layout.live
    assert live.fs_label is not None and live.fs_uuid is not None
    return ext4.Ext4Plan(
        size=live.size, inodes=live_inodes(live.size // BLOCK), label=live.fs_label,
        uuid=live.fs_uuid, epoch=epoch,
        hash_seed=ext4.hash_seed(live.fs_uuid, GUID_NAMESPACE))


def check_squashfs_header(head: bytes, *, size: int, name: str) -> None:
    """Refuse a file that is not a squashfs 4 image (or is cut short)."""
    if len(head) < 96 or head[:4] != b"hsqs":
        raise ImageError(f"{name} is not a squashfs image",
                         hint="pass the squashfs.img the build made")
    major, = struct.unpack_from("<H", head, 28)
    bytes_used, = struct.unpack_from("<Q", head, 40)
    if major != 4 or bytes_used > size:
        raise ImageError(f"{name} is a damaged or unsupported squashfs image "
                         f"(version {major}, {bytes_used} bytes used of {size})",
                         hint="rebuild it with mksquashfs 4")


# --------------------------------------------------------------------- GPT

GPT_SIGNATURE = b"EFI PART"
# signature, revision, header size, header CRC, (reserved), my LBA, alternate
# LBA, first usable, last usable, disk GUID, entries LBA, entry count, entry
# size, entries CRC.
_GPT_HEADER = struct.Struct("<8sIII4xQQQQ16sQIII")
_HEADER_CRC = slice(16, 20)
_DISK_GUID = slice(56, 72)
_ENTRIES_CRC = slice(88, 92)
_ENTRY = struct.Struct("<16s16sQQ")  # type GUID, unique GUID, first LBA, last LBA


@dataclass(frozen=True)
class GptHeader:
    my_lba: int
    alternate_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int

    @property
    def entries_bytes(self) -> int:
        return self.entry_count * self.entry_size


def _header_crc(sector: bytes | bytearray, header_size: int) -> int:
    raw = bytearray(sector[:header_size])
    raw[_HEADER_CRC] = bytes(4)
    return zlib.crc32(raw)


def parse_gpt_header(sector: bytes) -> GptHeader:
    """A GPT header sector, checked: signature, size and CRC."""
    if len(sector) < _GPT_HEADER.size:
        raise ImageError("GPT header is cut short")
    (signature, _revision, header_size, crc, my_lba, alternate_lba, _first, _last, guid,
     entries_lba, count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(sector)
    if signature != GPT_SIGNATURE:
        raise ImageError("no GPT header where one was written")
    if not _GPT_HEADER.size <= header_size <= len(sector) or entry_size < _ENTRY.size:
        raise ImageError(f"GPT header with unexpected sizes ({header_size}, {entry_size})")
    if _header_crc(sector, header_size) != crc:
        raise ImageError("GPT header checksum does not match")
    return GptHeader(my_lba=my_lba, alternate_lba=alternate_lba,
                     disk_guid=uuid.UUID(bytes_le=guid), entries_lba=entries_lba,
                     entry_count=count, entry_size=entry_size, entries_crc=entries_crc)


def patch_gpt(sector: bytes, entries: bytes, layout: DiskLayout) -> tuple[bytes, bytes]:
    """The header sector and entry array with the layout's GUIDs in place of
    the random ones parted chose, both checksums recomputed.  The same call
    serves the primary and the backup copy (they differ only in my/alternate
    LBA, which stay as they are).  Refuses entries that do not match the plan."""
    header = parse_gpt_header(sector)
    if len(entries) != header.entries_bytes or zlib.crc32(entries) != header.entries_crc:
        raise ImageError("GPT partition entries do not match their checksum")
    new = bytearray(entries)
    for index in range(header.entry_count):
        offset = index * header.entry_size
        type_guid, _unique, first, last = _ENTRY.unpack_from(entries, offset)
        if index >= len(layout.partitions):
            if type_guid != bytes(16):
                raise ImageError(f"GPT has a partition {index + 1} that was not planned")
            continue
        part = layout.partitions[index]
        if (first, last) != (part.first_lba, part.last_lba):
            raise ImageError(f"GPT partition {part.number} is at sectors {first}-{last}, "
                             f"planned {part.first_lba}-{part.last_lba}")
        _ENTRY.pack_into(new, offset, uuid.UUID(part.type_guid).bytes_le,
                         uuid.UUID(part.uuid).bytes_le, first, last)
    size = struct.unpack_from("<I", sector, 12)[0]
    out = bytearray(sector)
    out[_DISK_GUID] = uuid.UUID(layout.uuid).bytes_le
    out[_ENTRIES_CRC] = struct.pack("<I", zlib.crc32(new))
    out[_HEADER_CRC] = struct.pack("<I", _header_crc(out, size))
    return bytes(out), bytes(new)


# ------------------------------------------------------------- debugfs script


def tree_modes(live_dir: str) -> list[tuple[str, int]]:
    """Every inode of the live filesystem with its mode."""
    parts = live_dir.split("/")
    dirs = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return ([("", 0o040755), ("lost+found", 0o040700)] + [(d, 0o040755) for d in dirs]
            + [(f"{live_dir}/{SQUASHFS_IMG}", 0o100644)])


def populate_script(live_dir: str, *, source: str, epoch: int) -> bytes:
    """debugfs commands that make <live_dir>, copy `source` (a name in
    debugfs's working directory) in as squashfs.img, and give every inode
    root's ownership, its mode and the build time.

    debugfs's `write` and not `mkfs -d`: -d copies the source's xattrs
    (user.*, SELinux labels of the build host), and removing them afterwards
    leaves an empty xattr header in the inode, so images would differ by host."""
    def at(path: str) -> bytes:
        return debugfs.argument("/" + path)

    lines = [debugfs.command(b"mkdir", at(d)) for d, mode in tree_modes(live_dir)[2:-1]]
    # `write` links its second argument into the current directory as one name.
    lines += [debugfs.command(b"cd", at(live_dir)),
              debugfs.command(b"write", debugfs.argument(source), debugfs.argument(SQUASHFS_IMG)),
              debugfs.command(b"cd", at(""))]
    for path, mode in tree_modes(live_dir):
        target = at(path)
        lines += [debugfs.set_mode(target, mode), *debugfs.set_owner(target, 0, 0),
                  *debugfs.set_all_times(target, epoch * 1_000_000_000)]
    return debugfs.script(lines)


# ------------------------------------------------------------ doing it


def make_disk(squashfs: Path, disk: Path, *, label: str = "LIVE", live_dir: str = "LiveOS",
              overlay_size: int | None = None, epoch: int, scratch: Path) -> DiskLayout:
    """Write a new GPT disk image at `disk` holding `squashfs`; refuses to
    overwrite, and leaves nothing behind when it fails."""
    check_label(label)
    check_live_dir(live_dir)
    check_overlay_size(overlay_size)
    check_epoch(epoch)
    parted = import_parted()
    require_tools("mkfs.ext4", "debugfs")
    size, digest = inspect_squashfs(squashfs)
    seed = identity_seed(digest, label=label, live_dir=live_dir, overlay_size=overlay_size,
                         epoch=epoch)
    layout = plan(squashfs_size=size, label=label, live_dir=live_dir,
                  overlay_size=overlay_size, seed=seed)
    with step(f"disk image {disk.name} ({format_size(layout.size)})"), _new_file(disk):
        _allocate(disk, layout.size)
        write_partition_table(parted, disk, layout)
        rewrite_gpt_ids(disk, layout)
        zero_overlay_header(disk, layout)
        with _private_dir(scratch) as work:
            make_live_fs(disk, layout, squashfs=squashfs, epoch=epoch, work=work)
        for p in layout.partitions:
            info(f"partition {p.number} {p.name}: {format_size(p.size)}")
    return layout


def import_parted() -> Any:
    try:
        import parted
    except ImportError:
        raise ImageError(
            "pyparted is not installed: it writes the disk image's partition table",
            hint="apt-get install python3-parted (Debian), dnf install python3-pyparted "
                 "(Fedora); a virtualenv needs --system-site-packages to see it") from None
    return parted


def inspect_squashfs(squashfs: Path) -> tuple[int, str]:
    """Its size and sha256, after checking it is a squashfs."""
    try:
        with open(squashfs, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            check_squashfs_header(f.read(96), size=size, name=os.fspath(squashfs))
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise ImageError(f"{squashfs}: no such squashfs image",
                         hint="build the squashfs before the disk image") from None
    except OSError as exc:
        raise ImageError(f"cannot read {squashfs}: {exc.strerror}") from None
    return size, digest


@contextmanager
def _new_file(path: Path) -> Iterator[None]:
    """Create `path`, and remove it again if anything in the block fails."""
    try:
        open(path, "xb").close()
    except FileExistsError:
        raise ImageError(f"{path} already exists",
                         hint="remove it, or choose another name") from None
    except OSError as exc:
        raise ImageError(f"cannot create {path}: {exc.strerror}") from None
    try:
        yield
    except OSError as exc:
        path.unlink(missing_ok=True)
        where = exc.filename or path
        raise ImageError(f"cannot make {path.name}: {where}: {exc.strerror or exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextmanager
def _private_dir(scratch: Path) -> Iterator[Path]:
    # Absolute: debugfs runs in it, with paths to files in it.
    work = Path(tempfile.mkdtemp(prefix="disk-", dir=scratch)).absolute()
    try:
        yield work
    finally:
        discard_tree(work)


def _allocate(disk: Path, size: int) -> None:
    # Sparse: the holes cost nothing until written.
    os.truncate(disk, size)


# pyparted's exceptions share no base class.
PARTED_ERRORS = (
    "PartedException", "AlignmentException", "ConstraintException", "CreateException",
    "DeviceException", "DiskException", "DiskLabelException", "FileSystemException",
    "GeometryException", "IOException", "NotNeededException", "PartitionException",
    "UnknownDeviceException", "UnknownTypeException",
)


def _parted_errors(parted: Any) -> tuple[type[Exception], ...]:
    return tuple(getattr(parted, name) for name in PARTED_ERRORS if hasattr(parted, name))


def write_partition_table(parted: Any, disk: Path, layout: DiskLayout) -> None:
    """The GPT as planned, with parted's random GUIDs (rewrite_gpt_ids fixes them)."""
    try:
        device = parted.getDevice(os.fspath(disk))
    except _parted_errors(parted) as exc:
        raise ImageError(f"parted cannot open {disk}: {exc}") from None
    try:
        if device.sectorSize != SECTOR:
            raise ImageError(f"parted sees {device.sectorSize}-byte sectors in {disk}")
        table = parted.freshDisk(device, "gpt")
        for p in layout.partitions:
            geometry = parted.Geometry(device=device, start=p.first_lba,
                                       length=p.size // SECTOR)
            fs = (parted.FileSystem(type=p.filesystem, geometry=geometry)
                  if p.filesystem else None)
            part = parted.Partition(disk=table, type=parted.PARTITION_NORMAL, fs=fs,
                                    geometry=geometry)
            table.addPartition(part, constraint=parted.Constraint(exactGeom=geometry))
            part.set_name(p.name)
        # Only the device: a file has no kernel partition table to refresh,
        # and commit() would run udevadm.
        table.commitToDevice()
    except _parted_errors(parted) as exc:
        raise ImageError(f"parted cannot write the partition table of {disk}: {exc}",
                         hint="this is a bug in dmoverlay's disk layout; please report it"
                         ) from None
    finally:
        # libparted caches devices by path, sizes included: a later image at
        # the same path would be seen with this one's size.
        device.removeFromCache()


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ImageError("disk image is cut short")
    return data


def rewrite_gpt_ids(disk: Path, layout: DiskLayout) -> None:
    """Replace parted's random GUIDs, in the primary GPT and in the backup."""
    with open(disk, "r+b") as f:
        primary = parse_gpt_header(_read_at(f, SECTOR, SECTOR))
        for lba in (1, primary.alternate_lba):
            sector = _read_at(f, lba * SECTOR, SECTOR)
            header = parse_gpt_header(sector)
            entries = _read_at(f, header.entries_lba * SECTOR, header.entries_bytes)
            new_sector, new_entries = patch_gpt(sector, entries, layout)
            f.seek(header.entries_lba * SECTOR)
            f.write(new_entries)
            f.seek(lba * SECTOR)
            f.write(new_sector)


def zero_overlay_header(disk: Path, layout: DiskLayout) -> None:
    """Write the overlay's zero header as data, not leave it a hole: tools
    that copy a sparse image skip holes, which would leave what was on the
    stick before, and dm-snapshot would take that for a damaged store."""
    overlay = layout.overlay
    if overlay is None:
        return
    with open(disk, "r+b") as f:
        f.seek(overlay.start)
        f.write(bytes(OVERLAY_ZEROED))


def make_live_fs(disk: Path, layout: DiskLayout, *, squashfs: Path, epoch: int,
                 work: Path) -> None:
    """The ext4 of the live partition, in place, holding the squashfs."""
    fs = live_fs(layout, epoch=epoch)
    run(ext4.mkfs_argv(fs, disk, offset=layout.live.start), env=ext4.mkfs_env(fs))
    # A link of a known name in the private directory debugfs runs in: no
    # byte of the real path (a newline) reaches the script.
    (work / "source").symlink_to(squashfs.absolute())
    debugfs.run_script(disk, populate_script(layout.live_dir, source="source", epoch=epoch),
                       scratch=work, name="populate.debugfs", write=True,
                       offset=layout.live.start, epoch=epoch)
