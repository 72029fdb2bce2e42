"""How full the COW is: the free room, and a thin pool's status line."""

from __future__ import annotations

import pytest

from dmoverlay.core.cow import PoolStatus, parse_pool_status
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.status import Status


def test_status_free_is_the_smaller_limit() -> None:
    s = Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=512 * MiB)
    assert s.free == 512 * MiB and s.percent == 25.0
    full = Status("live", "/sysroot", "overflow", used=0, total=0, ram_free=GiB)
    assert full.free == 0


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
