"""Reads past the page cache, and the fallback where a filesystem has none."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dmoverlay.core.direct import open_direct, pread_direct, read_direct, size_of


def test_a_file_reads_back_whole_and_short_at_its_end(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096)
    (tmp_path / "f").write_bytes(data)
    assert read_direct(str(tmp_path / "f"), 4096, 4096) == data[4096:8192]
    fd = open_direct(str(tmp_path / "f"))
    try:
        assert size_of(fd) == len(data)
        assert pread_direct(fd, 8192, 8192) == data[8192:]
    finally:
        os.close(fd)


def test_a_file_where_o_direct_is_refused_is_read_through_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs refused O_DIRECT (EINVAL) until Linux 6.6, as in the VM's 6.1:
    injected here, where the kernel may be newer.  A device is not let off."""
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    (tmp_path / "f").write_bytes(b"x" * 4096)
    assert read_direct(str(tmp_path / "f"), 0, 4096) == b"x" * 4096
    with pytest.raises(OSError, match="Invalid argument"):
        open_direct("/dev/null")  # not a regular file: its cache may be stale
