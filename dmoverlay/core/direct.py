"""Reads past the page cache (O_DIRECT), for block devices the kernel
writes below it: a dm-snapshot's store and the snapshot itself are written
by device-mapper's own I/O, so a buffered read may see a stale page."""

from __future__ import annotations

import errno
import mmap
import os


def open_direct(path: str) -> int:
    """`path` opened to read past the page cache; a regular file on a
    filesystem without O_DIRECT (tmpfs before Linux 6.6) is read through
    it, which is coherent: a loop device writes a file through its cache."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not os.path.isfile(path):
            raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def pread_direct(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (both multiples of the device's logical
    block size), or fewer at the end; read into a page-aligned buffer, as
    O_DIRECT asks."""
    buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
    try:
        with memoryview(buf) as view:
            got = os.preadv(fd, [view[:length]], offset)
        return bytes(buf[:got])
    finally:
        buf.close()


def read_direct(path: str, offset: int, length: int) -> bytes:
    fd = open_direct(path)
    try:
        return pread_direct(fd, offset, length)
    finally:
        os.close(fd)


def size_of(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
