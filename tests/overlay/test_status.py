"""How full the COW is: the free room, and a thin pool's status line."""

from __future__ import annotations

from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.status import Status


def test_status_free_is_the_smaller_limit() -> None:
    s = Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=512 * MiB)
    assert s.free == 512 * MiB and s.percent == 25.0
    full = Status("live", "/sysroot", "overflow", used=0, total=0, ram_free=GiB)
    assert full.free == 0



def test_status_says_the_image_is_in_ram() -> None:
    s = Status("live", "/sysroot", "active", used=0, total=GiB, ram_free=GiB, ram_copy=MiB)
    assert s.to_dict()["ram_copy"] == MiB
    assert Status("live", "/sysroot", "active", 0, GiB, None).to_dict()["ram_copy"] == 0
