"""Finding the root filesystem: the image named followed down to
LiveOS/rootfs.img, through a disk's partitions, the boot medium's filesystem
and squashfs.img, each mounted read-only on the way (read-write when the
medium holds the persistent overlay too)."""

from __future__ import annotations

import json
import os
from contextlib import suppress
from pathlib import Path

from dmoverlay.core import debugfs
from dmoverlay.core.errors import DebugfsFailed, DmoverlayError, ImageError, UsageError
from dmoverlay.core.run import run
from dmoverlay.core.superblock import Kind, detect, parse_squashfs
from dmoverlay.overlay import devspec
from dmoverlay.overlay.dmtable import SECTOR, Mode
from dmoverlay.overlay.kernel import is_block
from dmoverlay.overlay.options import SetupOptions
from dmoverlay.overlay.recorder import Recorder

ROOTFS_NAMES = ("rootfs.img", "ext3fs.img")  # dracut's order


def find_rootfs(rec: Recorder, opts: SetupOptions, work: Path) -> tuple[Path, str]:
    """Follow the image down to LiveOS/rootfs.img, mounting what is on the way;
    also the live medium (dracut's livedev, which names the auto overlay)."""
    source = devspec.find(opts.image)
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file or device")
    kind = _kind_of(source)
    if kind is Kind.EXT and not _holds(source, opts):
        return Path(source), source  # a rootfs.img itself
    if kind is Kind.SQUASHFS:
        return _in_squashfs(rec, opts, work, source), source
    media, medium = _media(rec, opts, work, source, kind)
    rec.state.medium = os.fspath(media)
    squash = media / opts.live_dir / opts.squashfs_name
    if squash.is_file():
        return _in_squashfs(rec, opts, work, os.fspath(squash)), medium
    for name in ROOTFS_NAMES:
        if (media / opts.live_dir / name).is_file():
            return media / opts.live_dir / name, medium
    raise ImageError(f"{opts.image.text}: no {opts.live_dir}/{opts.squashfs_name} nor "
                     f"{opts.live_dir}/rootfs.img on it",
                     hint="check --live-dir and --squashfs-name (rd.live.dir, rd.live.squashimg)")


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


def _in_squashfs(rec: Recorder, opts: SetupOptions, work: Path, squash: str) -> Path:
    try:
        parse_squashfs(read_head(squash, 96), size=os.path.getsize(squash)
                       if not is_block(squash) else None)
    except DmoverlayError as exc:
        raise ImageError(f"{squash}: {exc.message}", hint="the image is damaged") from None
    dev = rec.loop(squash, read_only=True)
    where = rec.mkdir(work / "squashfs")
    rec.mount(dev, where, fstype="squashfs", options="ro")
    for name in ROOTFS_NAMES:
        if (where / opts.live_dir / name).is_file():
            return where / opts.live_dir / name
    raise ImageError(f"{squash}: no {opts.live_dir}/rootfs.img inside",
                     hint="build it with dmoverlay build, or check --live-dir")


def label_uuid(dev: str) -> tuple[str, str]:
    def tag(name: str) -> str:
        return run(["blkid", "-c", "/dev/null", "-o", "value", "-s", name, dev],
                   check=False).stdout.strip()
    return tag("LABEL"), tag("UUID")
