"""Copying the image into RAM (rd.live.ram): as fast as `cp`, by the kernel
in large chunks (copy_file_range, else sendfile, else read and write), with
progress for people.  Whether the copy fits is decided before, in
`options.ram_copy_cow`; where it goes, by setup."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.errors import OverlayError
from dmoverlay.core.sizes import MiB, format_size

CHUNK = 16 * MiB  # per call: few calls, and progress that moves
_BUFFER = MiB  # the last resort's reads
# What says "not this way": a kernel or filesystem without the call, or
# files on two filesystems (copy_file_range across them, since Linux 5.19)
_UNSUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                          errno.ENOTSUP})

Method = Callable[[int, int, int, int], int]  # (src, dst, offset, count) -> bytes copied


def _by_copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, dst, count, offset, offset)


def _by_sendfile(src: int, dst: int, offset: int, count: int) -> int:
    os.lseek(dst, offset, os.SEEK_SET)  # sendfile writes where dst stands
    return os.sendfile(dst, src, offset, count)


def _by_read_write(src: int, dst: int, offset: int, count: int) -> int:
    data = memoryview(os.pread(src, min(count, _BUFFER), offset))
    written = 0
    while written < len(data):
        written += os.pwrite(dst, data[written:], offset + written)
    return len(data)


METHODS: tuple[Method, ...] = (_by_copy_file_range, _by_sendfile, _by_read_write)


class _Copier:
    """The fastest way that works for these two files, found on the first
    chunk and kept: a way that fails as unsupported, or copies nothing where
    the next might (copy_file_range of some filesystems), gives way to the
    next; only the last one's end is the source's."""

    def __init__(self, methods: tuple[Method, ...]) -> None:
        self.methods = list(methods)

    def copy(self, src: int, dst: int, offset: int, count: int) -> int:
        while True:
            try:
                copied = self.methods[0](src, dst, offset, count)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED or len(self.methods) == 1:
                    raise
                copied = 0
            if copied or len(self.methods) == 1:
                return copied
            self.methods.pop(0)


class _Progress:
    """On a terminal, a percentage redrawn in place; elsewhere (the console
    at boot is not a terminal) a line at each quarter; nothing with --quiet."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.percent = log.Percent(label)
        self.next_line = 25

    def __call__(self, done: int) -> None:
        percent = done * 100 // self.total if self.total else 100
        if self.percent.shown:
            self.percent(percent)
        elif self.next_line <= percent < 100:
            log.info(f"{self.label}: {percent}% ({format_size(done)} of "
                     f"{format_size(self.total)})")
            self.next_line = percent // 25 * 25 + 25


def copy_image(source: str, dest: Path, size: int, *,
               methods: tuple[Method, ...] = METHODS) -> None:
    """Copy the first `size` bytes of `source` (a file or a block device) to
    `dest`, a new file.  OverlayError when the source ends early (a medium
    pulled out, an image cut short) or a read or write fails; what was
    copied stays for the caller to remove (at setup, with its tmpfs)."""
    progress = _Progress("copying to RAM", size)
    start = time.monotonic()
    done = 0
    try:
        with open(source, "rb") as src, open(dest, "xb") as dst:
            copier = _Copier(methods)
            while done < size:
                copied = copier.copy(src.fileno(), dst.fileno(), done, min(CHUNK, size - done))
                if copied <= 0:
                    raise OverlayError(f"cannot copy {source} to RAM: it ends after "
                                       f"{done} of {size} bytes",
                                       hint="the medium was removed or is damaged")
                done += copied
                progress(done)
    except OSError as exc:
        raise OverlayError(f"cannot copy {source} to RAM: {exc.strerror or exc} (after {done} of "
                           f"{size} bytes)", hint="the medium was removed or is damaged, "
                           "or the RAM ran out") from None
    seconds = time.monotonic() - start
    log.info(f"copied {format_size(size)} in {seconds:.1f} s"
             + (f" ({format_size(int(size / seconds))}/s)" if seconds > 0 else ""))
