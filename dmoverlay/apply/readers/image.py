"""A squashfs or ext2/3/4 updates image, mounted read-only under the
staging directory and read as a directory."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmoverlay.apply.readers.detect import Format
from dmoverlay.apply.readers.directory import DirectoryReader
from dmoverlay.core.errors import CommandFailed, SourceError
from dmoverlay.core.run import run

_MOUNT = {
    # nodev/nosuid/noexec: nothing on the image is run or opened as a device;
    # noload: a journal needing recovery is not replayed (that would write).
    Format.SQUASHFS: ("squashfs", "ro,loop,nodev,nosuid,noexec"),
    Format.EXT: ("ext4", "ro,loop,noload,nodev,nosuid,noexec"),
}


@contextmanager
def open_image(image: Path, fmt: Format, *, staging: Path,
               label: str) -> Iterator[DirectoryReader]:
    """A squashfs or ext2/3/4 image mounted read-only (through a read-only
    loop device) under `staging`, read as a directory; unmounted on exit.

    Mounting needs root, but so does applying an update; unpacking instead
    (unsquashfs, debugfs rdump) would lose owners, devices and xattrs when
    not root, and would copy the whole image into RAM under /run."""
    if os.geteuid() != 0:
        raise SourceError(f"{label}: reading a {fmt} image needs root (it is mounted "
                          "read-only)", hint="run as root, or unpack the image into a "
                                             "directory and give that")
    fstype, options = _MOUNT[fmt]
    mountpoint = Path(tempfile.mkdtemp(prefix="image-", dir=staging))
    try:
        try:
            # An absolute path: neither an option ("-...") nor a tag (LABEL=...).
            run(["mount", "-t", fstype, "-o", options, os.path.abspath(image), mountpoint])
        except CommandFailed as exc:
            raise SourceError(f"{label}: cannot mount the {fmt} image ({exc.message})",
                              hint="the image may be damaged, or the kernel lacks "
                                   f"loop or {fstype} support") from None
        try:
            yield DirectoryReader(mountpoint, description=f"{fmt} image {label}",
                                  hide_empty_lost_found=fmt is Format.EXT, in_place=True)
        finally:
            _unmount(mountpoint)
    finally:
        if not os.path.ismount(mountpoint):
            os.rmdir(mountpoint)


def _unmount(mountpoint: Path, attempts: int = 5) -> None:
    # A pass abandoned mid-file may hold a descriptor until its generator is
    # collected: retry a busy unmount a little before giving up.
    for attempt in range(attempts):
        try:
            run(["umount", mountpoint])
            return
        except CommandFailed:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
