"""A squashfs or ext2/3/4 updates image, mounted read-only under the
staging directory and read as a directory.

As root, the kernel mounts it through a read-only loop device.  Without
root (mkupdates' sides in CI), an ext image is mounted with FUSE (fuse2fs),
and a squashfs only if it is what build makes (LiveOS/rootfs.img and nothing
else): that one file is unpacked (unsquashfs) and the ext image in it is
then read the same way.  Another squashfs is refused: the FUSE squashfs
reader Debian 12 ships (squashfuse 0.1.104) swaps xattr names between
namespaces, and unpacking as a user loses owners and xattrs."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dmoverlay.apply.readers.detect import Format
from dmoverlay.apply.readers.directory import DirectoryReader
from dmoverlay.core.errors import CommandFailed, SourceError
from dmoverlay.core.run import find_tool, run
from dmoverlay.core.tree import discard_tree

_MOUNT = {
    # nodev/nosuid/noexec: nothing on the image is run or opened as a device;
    # noload: a journal needing recovery is not replayed (that would write).
    Format.SQUASHFS: ("squashfs", "ro,loop,nodev,nosuid,noexec"),
    Format.EXT: ("ext4", "ro,loop,noload,nodev,nosuid,noexec"),
}
# ro: fuse2fs opens the image read-only (no journal replay either);
# fakeroot: it checks no permissions, so every file is read whoever asks.
# (It asks for use_ino itself: the image's inode numbers show hard links.)
_FUSE2FS = "ro,fakeroot,nodev,nosuid,noexec"
FUSE_DEVICE = "/dev/fuse"
LIVE_ROOTFS = "LiveOS/rootfs.img"  # all a squashfs.img made by build holds


@contextmanager
def open_image(image: Path, fmt: Format, *, staging: Path, label: str,
               privileged: bool | None = None) -> Iterator[DirectoryReader]:
    """A squashfs or ext2/3/4 image mounted read-only under `staging`, read
    as a directory; unmounted (and anything unpacked removed) on exit.
    `privileged`: mount with the kernel (root) or without (None: as root
    or not).  Unpacking all of it instead (unsquashfs, debugfs rdump)
    would lose owners, devices and xattrs when not root, and copy the
    whole image under /run."""
    if privileged is None:
        privileged = os.geteuid() == 0
    with ExitStack() as stack:
        if privileged:
            mountpoint = stack.enter_context(_mountpoint(staging))
            _kernel_mount(image, fmt, mountpoint, label)
            stack.callback(_unmount, ["umount", mountpoint])
        elif fmt is Format.EXT:
            mountpoint = stack.enter_context(_mountpoint(staging))
            _fuse_mount(image, mountpoint, label)
            stack.callback(_unmount, [_fusermount(), "-u", mountpoint])
        else:
            mountpoint = stack.enter_context(_unpacked_live_image(image, staging, label))
        yield DirectoryReader(mountpoint, description=f"{fmt} image {label}",
                              hide_empty_lost_found=fmt is Format.EXT, in_place=True)


@contextmanager
def _mountpoint(staging: Path) -> Iterator[Path]:
    mountpoint = Path(tempfile.mkdtemp(prefix="image-", dir=staging))
    try:
        yield mountpoint
    finally:
        if not os.path.ismount(mountpoint):
            os.rmdir(mountpoint)


def _kernel_mount(image: Path, fmt: Format, mountpoint: Path, label: str) -> None:
    fstype, options = _MOUNT[fmt]
    try:
        # An absolute path: neither an option ("-...") nor a tag (LABEL=...).
        run(["mount", "-t", fstype, "-o", options, os.path.abspath(image), mountpoint])
    except CommandFailed as exc:
        raise SourceError(f"{label}: cannot mount the {fmt} image ({exc.message})",
                          hint="the image may be damaged, or the kernel lacks "
                               f"loop or {fstype} support") from None


def _need_fuse(label: str) -> None:
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        why = "there is none" if not os.path.exists(FUSE_DEVICE) else "it is not this user's"
        raise SourceError(f"{label}: reading an ext image without root needs FUSE, and "
                          f"{FUSE_DEVICE} cannot be opened ({why})",
                          hint=f"run as root, or let this user open {FUSE_DEVICE} (udev "
                               "makes it 0666; a container needs it passed in)")


def _fuse_mount(image: Path, mountpoint: Path, label: str) -> None:
    _need_fuse(label)
    try:
        # an absolute path, never taken for an option (fuse2fs knows no "--")
        run(["fuse2fs", "-o", _FUSE2FS, os.path.abspath(image), mountpoint])
    except CommandFailed as exc:
        raise SourceError(f"{label}: cannot mount the ext image with fuse2fs "
                          f"({exc.message})", hint="the image may be damaged") from None


def _fusermount() -> str:
    # libfuse 3's name; fuse 2 alone installs it as fusermount
    return "fusermount3" if find_tool("fusermount3") or not find_tool("fusermount") \
        else "fusermount"


@contextmanager
def _unpacked_live_image(image: Path, staging: Path, label: str) -> Iterator[Path]:
    """The one file in a squashfs.img made by build, unpacked under
    `staging` as LiveOS/rootfs.img (sparse, as unsquashfs writes it)."""
    refused = SourceError(f"{label}: reading a squashfs image without root works only for "
                          f"the one build makes ({LIVE_ROOTFS} and nothing else)",
                          hint="run as root, or unpack the image into a directory as root "
                               "and give that")
    _need_fuse(label)  # for the ext image inside: known before unpacking it
    listing = _listing(image, label)
    if listing != ["squashfs-root", "squashfs-root/LiveOS", f"squashfs-root/{LIVE_ROOTFS}"]:
        raise refused
    top = Path(tempfile.mkdtemp(prefix="image-", dir=staging))
    try:
        try:
            run(["unsquashfs", "-no-progress", "-no-xattrs", "-no-wildcards",
                 "-d", top / "image", os.path.abspath(image), LIVE_ROOTFS])
        except CommandFailed as exc:
            raise SourceError(f"{label}: cannot unpack {LIVE_ROOTFS} ({exc.message})",
                              hint=_space_hint(exc)) from None
        inner = top / "image" / LIVE_ROOTFS
        # what came out is judged, not what the listing said
        if not inner.is_file() or inner.is_symlink() \
                or os.listdir(top / "image") != ["LiveOS"] \
                or os.listdir(top / "image/LiveOS") != ["rootfs.img"]:
            raise refused
        yield top / "image"
    finally:
        discard_tree(top)


def _listing(image: Path, label: str) -> list[str]:
    try:
        out = run(["unsquashfs", "-no-progress", "-max-depth", "2", "-l",
                   os.path.abspath(image)]).stdout
    except CommandFailed as exc:
        raise SourceError(f"{label}: cannot read the squashfs image ({exc.message})",
                          hint="the image may be damaged") from None
    return [line for line in out.splitlines() if line.startswith("squashfs-root")]


def _space_hint(exc: CommandFailed) -> str | None:
    text = exc.stderr + exc.message
    if "No space left" in text or os.strerror(errno.ENOSPC) in text:
        return "unpacking needs room for the ext image (sparse) beside the output"
    return "the image may be damaged"


def _unmount(argv: list[str | os.PathLike[str]], attempts: int = 5) -> None:
    # A pass abandoned mid-file may hold a descriptor until its generator is
    # collected: retry a busy unmount a little before giving up.
    for attempt in range(attempts):
        try:
            run(argv)
            return
        except CommandFailed:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
