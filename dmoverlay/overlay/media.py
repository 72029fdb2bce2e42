"""Finding the root filesystem: the image named followed down to
LiveOS/rootfs.img, through a disk's partitions, the boot medium's filesystem
and squashfs.img, each mounted read-only on the way (read-write when the
medium holds the persistent overlay too)."""

from __future__ import annotations

import json
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import debugfs
from dmoverlay.core.errors import DebugfsFailed, DmoverlayError, ImageError, UsageError
from dmoverlay.core.run import run
from dmoverlay.core.sizes import KiB, round_up
from dmoverlay.core.superblock import Kind, detect, parse_ext4, parse_squashfs
from dmoverlay.overlay import devspec
from dmoverlay.overlay.dmtable import SECTOR, Mode
from dmoverlay.overlay.kernel import device_sectors, is_block
from dmoverlay.overlay.options import SetupOptions
from dmoverlay.overlay.recorder import Recorder

ROOTFS_NAMES = ("rootfs.img", "ext3fs.img")  # dracut's order


@dataclass(frozen=True)
class Found:
    """What holds the root filesystem, as found: a squashfs.img holding
    LiveOS/rootfs.img, or the rootfs.img itself; and the live medium
    (dracut's livedev, which names the auto overlay)."""

    image: str
    squashfs: bool
    medium: str


def find_image(rec: Recorder, opts: SetupOptions, work: Path) -> Found:
    """Follow the image named down to the squashfs.img or rootfs.img that
    holds the root filesystem, mounting the medium on the way."""
    source = devspec.find(opts.image)
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file or device")
    kind = _kind_of(source)
    if kind is Kind.EXT and not _holds(source, opts):
        return Found(source, False, source)  # a rootfs.img itself
    if kind is Kind.SQUASHFS:
        return Found(_checked_squashfs(source), True, source)
    media, medium = _media(rec, opts, work, source, kind)
    rec.state.medium = os.fspath(media)
    squash = media / opts.live_dir / opts.squashfs_name
    if squash.is_file():
        return Found(_checked_squashfs(os.fspath(squash)), True, medium)
    for name in ROOTFS_NAMES:
        if (media / opts.live_dir / name).is_file():
            return Found(os.fspath(media / opts.live_dir / name), False, medium)
    raise ImageError(f"{opts.image.text}: no {opts.live_dir}/{opts.squashfs_name} nor "
                     f"{opts.live_dir}/rootfs.img on it",
                     hint="check --live-dir and --squashfs-name (rd.live.dir, rd.live.squashimg)")


def find_rootfs(rec: Recorder, opts: SetupOptions, work: Path) -> tuple[Path, str]:
    """Follow the image down to LiveOS/rootfs.img, mounting what is on the way;
    also the live medium."""
    found = find_image(rec, opts, work)
    return rootfs_in(rec, opts, work, found.image, squashfs=found.squashfs), found.medium


def rootfs_in(rec: Recorder, opts: SetupOptions, work: Path, image: str, *, squashfs: bool,
              shown: str = "") -> Path:
    """The rootfs.img: `image` itself, or inside it once mounted (`shown`: the
    name to give it in a message, when `image` is a copy)."""
    return _in_squashfs(rec, opts, work, image, shown or image) if squashfs else Path(image)


def image_size(image: str, *, squashfs: bool) -> int:
    """The bytes that make the image: a file whole; on a block device (a
    partition is often larger than its filesystem), what its superblock
    says, in whole 4 KiB blocks as a loop device needs them."""
    if not is_block(image):
        return os.path.getsize(image)
    head = read_head(image, 2048)
    try:
        size = parse_squashfs(head[:96]).bytes_used if squashfs else \
            parse_ext4(head[1024:2048]).size
    except DmoverlayError as exc:
        raise ImageError(f"{image}: {exc.message}", hint="the image is damaged") from None
    return min(round_up(size, 4 * KiB), device_sectors(image) * SECTOR)


def read_head(source: str, size: int = 65536) -> bytes:
    with open(source, "rb") as f:
        return f.read(size)


def _kind_of(source: str) -> Kind | str:
    head = read_head(source)
    if head[32769:32774] == b"CD001":
        return "iso9660"
    return detect(head)


def _holds(source: str, opts: SetupOptions) -> bool:
    """Does an ext filesystem (not mounted) hold the live directory?"""
    try:
        answer = debugfs.request(source, b"stat", debugfs.argument(f"/{opts.live_dir}"))
    except DebugfsFailed:
        return False  # not an ext filesystem debugfs can read
    return "Inode:" in answer


def _media(rec: Recorder, opts: SetupOptions, work: Path, source: str,
           kind: Kind | str) -> tuple[Path, str]:
    """Mount the boot medium (a filesystem, or the partition of a disk that
    holds the live directory) read-only; read-write when it holds the
    persistent overlay too, as a live stick made by livecd-iso-to-disk does."""
    candidates = _partitions(source) if kind in (Kind.GPT, Kind.MBR) else [(0, 0)]
    for offset, size in candidates:
        dev = source
        if offset or size or not is_block(source):
            dev = rec.loop(source, read_only=True, offset=offset, size=size)
        fstype = fs_type(dev)
        if fstype not in ("ext2", "ext3", "ext4", "iso9660", "vfat", "squashfs"):
            continue
        where = rec.mkdir(work / f"media{len(rec.state.steps)}")
        rec.mount(dev, where, fstype=fstype, options="rw" if _holds_overlay(opts, dev) else "ro")
        if (where / opts.live_dir).is_dir():
            return where, dev
    raise ImageError(f"{opts.image.text}: no filesystem on it holds {opts.live_dir}/",
                     hint="check --live-dir (rd.live.dir)")


def _holds_overlay(opts: SetupOptions, dev: str) -> bool:
    """Is this block device the one a read-write persistent overlay is on?"""
    where = opts.overlay.where if opts.overlay and opts.mode is Mode.PERSISTENT else None
    if where is None or not is_block(dev):
        return False
    with suppress(DmoverlayError, OSError):
        named = devspec.find(where)
        return is_block(named) and os.stat(named).st_rdev == os.stat(dev).st_rdev
    return False


def _partitions(source: str) -> list[tuple[int, int]]:
    # sfdisk, not pyparted as inspect uses: an initramfs has util-linux, seldom
    # libparted's Python binding, and a file and a device read alike
    return parse_partitions(run(["sfdisk", "--json", source]).stdout, where=source)


def parse_partitions(text: str, *, where: str) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition `sfdisk --json` lists; what
    it says of a hostile table is input too."""
    try:
        table = json.loads(text)["partitiontable"]
        sector = int(table.get("sectorsize", SECTOR))
        found = [(int(p["start"]) * sector, int(p["size"]) * sector)
                 for p in table.get("partitions", [])]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        sector, found = 0, []
    if sector <= 0 or any(offset < 0 or size < 0 for offset, size in found):
        raise ImageError(f"{where}: sfdisk reads no usable partition table",
                         hint="the disk image is damaged")
    return found


def fs_type(dev: str) -> str:
    return run(["blkid", "-c", "/dev/null", "-o", "value", "-s", "TYPE", dev],
               check=False).stdout.strip()


def _checked_squashfs(squash: str) -> str:
    try:
        parse_squashfs(read_head(squash, 96), size=os.path.getsize(squash)
                       if not is_block(squash) else None)
    except DmoverlayError as exc:
        raise ImageError(f"{squash}: {exc.message}", hint="the image is damaged") from None
    return squash


def _in_squashfs(rec: Recorder, opts: SetupOptions, work: Path, squash: str,
                 shown: str) -> Path:
    dev = rec.loop(squash, read_only=True)
    where = rec.mkdir(work / "squashfs")
    rec.mount(dev, where, fstype="squashfs", options="ro")
    for name in ROOTFS_NAMES:
        if (where / opts.live_dir / name).is_file():
            return where / opts.live_dir / name
    raise ImageError(f"{shown}: no {opts.live_dir}/rootfs.img inside",
                     hint="build it with dmoverlay build, or check --live-dir")


def label_uuid(dev: str) -> tuple[str, str]:
    def tag(name: str) -> str:
        return run(["blkid", "-c", "/dev/null", "-o", "value", "-s", name, dev],
                   check=False).stdout.strip()
    return tag("LABEL"), tag("UUID")
