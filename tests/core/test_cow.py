"""Reading a snapshot's COW fill (the parsing; the real thing runs in the VM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmoverlay.core.cow import (
    PoolStatus,
    SnapshotStatus,
    State,
    dm_name,
    parse_pool_status,
    parse_status,
)
from dmoverlay.core.errors import DmoverlayError


def test_active_snapshot() -> None:
    s = parse_status("0 4194304 snapshot 2048/65536 16\n")
    assert s == SnapshotStatus(State.ACTIVE, 2048, 65536, 16)
    assert s.used_bytes == 2048 * 512 and s.total_bytes == 65536 * 512
    assert s.free_bytes == (65536 - 2048) * 512
    assert s.percent == pytest.approx(3.125)


@pytest.mark.parametrize(("word", "state"), [("Invalid", State.INVALID),
                                             ("Overflow", State.OVERFLOW)])
def test_full_snapshot_has_no_room(word: str, state: State) -> None:
    s = parse_status(f"0 4194304 snapshot {word}")
    assert s.state is state and s.free_bytes == 0


@pytest.mark.parametrize("line", ["", "0 100 linear 7:0 0", "garbage"])
def test_not_a_snapshot(line: str) -> None:
    with pytest.raises(DmoverlayError):
        parse_status(line)


def test_dm_name_reads_sysfs(tmp_path: Path) -> None:
    dev = os.makedev(253, 3)
    (tmp_path / "dev/block/253:3/dm").mkdir(parents=True)
    (tmp_path / "dev/block/253:3/dm/name").write_text("live-rw\n")
    assert dm_name(dev, sysfs=tmp_path) == "live-rw"
    assert dm_name("253:3", sysfs=tmp_path) == "live-rw"  # as a table names a device
    assert dm_name(os.makedev(8, 1), sysfs=tmp_path) is None


def test_a_plain_directory_is_not_on_a_snapshot(tmp_path: Path) -> None:
    from dmoverlay.core.cow import free_bytes

    assert free_bytes(str(tmp_path)) is None


def test_pool_status() -> None:
    line = "0 2048 thin-pool 1 11/1024 3/16 - rw discard_passdown error_if_no_space - 1024\n"
    assert parse_pool_status(line) == PoolStatus("active", 3 * 65536, 16 * 65536)
    # dracut's pools have 512 KiB blocks: the size comes from the pool's table
    assert parse_pool_status(line, 1024) == PoolStatus("active", 3 * 524288, 16 * 524288)
    full = "0 2048 thin-pool 1 11/1024 16/16 - out_of_data_space discard_passdown error"
    assert parse_pool_status(full).state == "full"
    assert parse_pool_status("0 2048 thin-pool Fail").state == "failed"
    with pytest.raises(ValueError):
        parse_pool_status("0 2048 linear 7:1 0")
