"""The kernel under the harness: a dm-snapshot over a read-only loop, as dracut's
dmsquash-live sets up `live-rw`, with its COW on a tmpfs.  These prove that
scripts/vmtest gives a test root, device-mapper, loop and squashfs, and record what
the kernel does when the COW fills."""

from __future__ import annotations

import errno
import mmap
import os
from contextlib import ExitStack
from pathlib import Path

import pytest

from dmoverlay.core.cow import State
from tests.privileged.kernel import (
    SECTOR,
    MiB,
    device_sectors,
    dm_device,
    dm_name,
    loop_device,
    make_ext4,
    mounted,
    run,
    sha256,
    snapshot_status,
    sparse_file,
    tmpfs,
)

pytestmark = pytest.mark.privileged

CHUNK = 8  # sectors: dracut's chunk size, 4 KiB


def small_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("NAME=base\n")
    return root


def write_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def _direct_buffer(size: int, fill: int) -> mmap.mmap:
    """Page-aligned memory, as O_DIRECT needs."""
    buffer = mmap.mmap(-1, size)
    buffer.write(bytes([fill]) * size)
    return buffer


def assert_writes_fail(device: Path) -> None:
    """Linux opens a read-only block device for writing; the write is what fails
    (EPERM from Debian's 6.1)."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, _direct_buffer(4096, 0xFF), 0)
        assert refused.value.errno in (errno.EPERM, errno.EROFS, errno.EIO)
    finally:
        os.close(fd)


def test_snapshot_over_a_read_only_loop_keeps_the_base_unchanged(tmp_path: Path) -> None:
    base = make_ext4(tmp_path / "rootfs.img", size=64 * MiB, tree=small_tree(tmp_path / "tree"))
    before = sha256(base)
    name = dm_name("live-rw")
    with ExitStack() as stack:
        base_dev = stack.enter_context(loop_device(base, read_only=True))
        assert_writes_fail(base_dev)
        ram = stack.enter_context(tmpfs(tmp_path / "ram", size=64 * MiB))
        cow = sparse_file(ram / "overlay", 32 * MiB)
        cow_dev = stack.enter_context(loop_device(cow, read_only=False))
        table = f"0 {device_sectors(base_dev)} snapshot {base_dev} {cow_dev} PO {CHUNK}"
        node = stack.enter_context(dm_device(name, table))
        fresh = snapshot_status(name)
        assert fresh.state == "active"
        assert fresh.total == 32 * MiB // SECTOR

        root = stack.enter_context(mounted(node, tmp_path / "root"))
        assert (root / "etc" / "os-release").read_text() == "NAME=base\n"
        (root / "etc" / "os-release").write_text("NAME=changed\n")
        write_file(root / "new", 8 * MiB)
        os.sync()
        written = snapshot_status(name)
        assert written.state == "active"
        assert written.allocated >= fresh.allocated + 8 * MiB // SECTOR
        assert written.metadata > fresh.metadata
        # The COW's pages really are in RAM now, no more than the snapshot says.
        assert 8 * MiB <= os.stat(cow).st_blocks * 512 <= written.allocated * SECTOR

    assert sha256(base) == before
    assert name not in run("dmsetup", "ls")
    assert run("losetup", "--associated", base).strip() == ""


def test_persistent_cow_brings_the_changes_back(tmp_path: Path) -> None:
    """A `P`/`PO` store keeps its exception table in the COW: the same COW file,
    assembled again over the same base, shows the writes (a persistent overlay)."""
    base = make_ext4(tmp_path / "rootfs.img", size=32 * MiB, tree=small_tree(tmp_path / "tree"))
    with ExitStack() as stack:
        base_dev = stack.enter_context(loop_device(base, read_only=True))
        ram = stack.enter_context(tmpfs(tmp_path / "ram", size=32 * MiB))
        cow = sparse_file(ram / "overlay", 16 * MiB)
        table = "0 {} snapshot {} {} PO {}"
        for round_ in ("write", "read back"):
            with ExitStack() as assembly:
                cow_dev = assembly.enter_context(loop_device(cow, read_only=False))
                name = dm_name("persist")
                node = assembly.enter_context(dm_device(
                    name, table.format(device_sectors(base_dev), base_dev, cow_dev, CHUNK)))
                root = assembly.enter_context(mounted(node, tmp_path / "root"))
                if round_ == "write":
                    (root / "etc" / "os-release").write_text("NAME=persisted\n")
                else:
                    assert (root / "etc" / "os-release").read_text() == "NAME=persisted\n"


@pytest.mark.parametrize(("store", "full_state"),
                         [("PO", State.OVERFLOW), ("N", State.INVALID)])
def test_a_full_cow_makes_the_snapshot(tmp_path: Path, store: str, full_state: str) -> None:
    """Fills a 1 MiB COW with 4 MiB of writes and records what the kernel does.
    PO (dracut's live-rw): the snapshot overflows, writes fail, reads still work.
    N (livecd-tools on tmpfs): the snapshot is invalidated, reads fail too."""
    base = tmp_path / "base.img"
    base.write_bytes(bytes([0xBA]) * 16 * MiB)
    block = 64 * 1024
    written = 0
    with ExitStack() as stack:
        base_dev = stack.enter_context(loop_device(base, read_only=True))
        ram = stack.enter_context(tmpfs(tmp_path / "ram", size=8 * MiB))
        cow_dev = stack.enter_context(
            loop_device(sparse_file(ram / "overlay", 1 * MiB), read_only=False))
        name = dm_name(f"full-{store}")
        node = stack.enter_context(dm_device(
            name, f"0 {device_sectors(base_dev)} snapshot {base_dev} {cow_dev} {store} {CHUNK}"))

        data = _direct_buffer(block, 0x5E)
        fd = os.open(node, os.O_RDWR | os.O_DIRECT)
        stack.callback(os.close, fd)
        with pytest.raises(OSError) as full:
            while written < 4 * MiB:
                written += os.pwrite(fd, data, written)
        assert full.value.errno == errno.EIO
        state = snapshot_status(name).state
        print(f"{store}: {written // 1024} KiB written into a 1 MiB COW, then EIO; "
              f"status {state}")
        assert state == full_state
        assert 0 < written <= 1 * MiB
        if store == "PO":  # its header and exception table take chunks of the COW
            assert written < 1 * MiB

        with pytest.raises(OSError) as again:
            os.pwrite(fd, data, 0)
        assert again.value.errno == errno.EIO

        back = _direct_buffer(block, 0)
        if store == "PO":
            # What was written before the overflow stays; the rest is the base.
            assert os.preadv(fd, [back], 0) == block
            assert back[:] == data[:]
            assert os.preadv(fd, [back], 8 * MiB) == block
            assert back[:] == bytes([0xBA]) * block
        else:
            with pytest.raises(OSError) as unreadable:
                os.preadv(fd, [back], 0)
            assert unreadable.value.errno == errno.EIO


def test_ext4_in_squashfs_as_dmsquash_live_assembles_it(tmp_path: Path) -> None:
    """squashfs on a read-only loop, mounted; LiveOS/rootfs.img inside on a second
    read-only loop; `live-rw` over it with the COW on tmpfs; ext4 mounted from it."""
    live = tmp_path / "image" / "LiveOS"
    live.mkdir(parents=True)
    make_ext4(live / "rootfs.img", size=32 * MiB, tree=small_tree(tmp_path / "tree"))
    squashfs = tmp_path / "squashfs.img"
    run("mksquashfs", tmp_path / "image", squashfs, "-comp", "gzip", "-no-progress", "-quiet")
    before = sha256(squashfs)
    with ExitStack() as stack:
        squash_dev = stack.enter_context(loop_device(squashfs, read_only=True))
        medium = stack.enter_context(
            mounted(squash_dev, tmp_path / "squash", "ro", fstype="squashfs"))
        base_dev = stack.enter_context(
            loop_device(medium / "LiveOS" / "rootfs.img", read_only=True))
        ram = stack.enter_context(tmpfs(tmp_path / "ram", size=32 * MiB))
        cow_dev = stack.enter_context(
            loop_device(sparse_file(ram / "overlay", 16 * MiB), read_only=False))
        name = dm_name("live-rw")
        node = stack.enter_context(dm_device(
            name, f"0 {device_sectors(base_dev)} snapshot {base_dev} {cow_dev} PO {CHUNK}"))
        root = stack.enter_context(mounted(node, tmp_path / "root"))
        assert (root / "etc" / "os-release").read_text() == "NAME=base\n"
        (root / "etc" / "hostname").write_text("live\n")
        assert snapshot_status(name).allocated > 0
    assert sha256(squashfs) == before
