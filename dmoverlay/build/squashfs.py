"""squashfs.img: the outer, compressed layer.  Options are checked here, in
pure code, before mksquashfs runs for minutes."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.errors import UsageError
from dmoverlay.core.run import run_with_percent
from dmoverlay.core.sizes import KiB, MiB, format_size


class Compressor(StrEnum):
    XZ = "xz"
    ZSTD = "zstd"
    LZ4 = "lz4"
    GZIP = "gzip"
    LZO = "lzo"


# mksquashfs 4.5's level ranges; xz and lz4 have none (lz4 has only -Xhc).
LEVELS: dict[Compressor, tuple[int, int]] = {
    Compressor.ZSTD: (1, 22),
    Compressor.GZIP: (1, 9),
    Compressor.LZO: (1, 9),
}


@dataclass(frozen=True)
class SquashOptions:
    compressor: Compressor = Compressor.XZ
    level: int | None = None
    block_size: int = 128 * KiB

    def __post_init__(self) -> None:
        if self.level is not None:
            bounds = LEVELS.get(self.compressor)
            if bounds is None:
                raise UsageError(f"{self.compressor} takes no compression level in mksquashfs",
                                 hint="leave out --level, or choose zstd, gzip or lzo")
            low, high = bounds
            if not low <= self.level <= high:
                raise UsageError(f"{self.compressor} level must be {low} to {high}")
        bs = self.block_size
        if bs < 4 * KiB or bs > MiB or bs & (bs - 1):
            raise UsageError(f"block size {format_size(bs)} is not a power of two "
                             "from 4 KiB to 1 MiB")


def mksquashfs_argv(tree: Path, image: Path, opts: SquashOptions, *, epoch: int,
                    machine: str | None = None) -> list[str]:
    argv = [
        "mksquashfs", os.fspath(tree), os.fspath(image), "-noappend", "-no-xattrs",
        "-all-root", "-mkfs-time", str(epoch), "-all-time", str(epoch),
        "-comp", opts.compressor.value, "-b", str(opts.block_size),
    ]
    if opts.level is not None:
        argv += ["-Xcompression-level", str(opts.level)]
    # The payload is an ext4 image of executables: the branch filter helps xz
    # on x86 as it does for lorax.
    if opts.compressor is Compressor.XZ and (machine or platform.machine()) in (
            "x86_64", "i686", "i386"):
        argv += ["-Xbcj", "x86"]
    return argv


def make(tree: Path, image: Path, opts: SquashOptions, *, epoch: int) -> None:
    run_with_percent(mksquashfs_argv(tree, image, opts, epoch=epoch),
                     on_percent=log.Percent("compressing"))
