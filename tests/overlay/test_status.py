"""How full the COW is: the free room, and a thin pool's status line."""

from __future__ import annotations

import pytest

from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.status import Status, table_size


def test_status_free_is_the_smaller_limit() -> None:
    s = Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=512 * MiB)
    assert s.free == 512 * MiB and s.percent == 25.0
    full = Status("live", "/sysroot", "overflow", used=0, total=0, ram_free=GiB)
    assert full.free == 0



def test_status_says_the_image_is_in_ram() -> None:
    s = Status("live", "/sysroot", "active", used=0, total=GiB, ram_free=GiB, ram_copy=MiB)
    assert s.to_dict()["ram_copy"] == MiB
    assert Status("live", "/sysroot", "active", 0, GiB, None).to_dict()["ram_copy"] == 0


# ------------------------------------------------------------------- layers


def test_a_ram_overlay_is_the_base_under_a_ram_layer() -> None:
    s = Status("live", "/sysroot", "active", used=MiB, total=64 * MiB, ram_free=GiB,
               image="/run/initramfs/live/LiveOS/squashfs.img", base_size=2 * GiB,
               cow_file="/run/dmoverlay/live/cow")
    assert [layer.to_dict() for layer in s.layers()] == [
        {"layer": "base", "holds": "the image, read-only",
         "path": "/run/initramfs/live/LiveOS/squashfs.img", "used": None, "size": 2 * GiB,
         "state": None, "percent": None, "ram_free": None},
        {"layer": "ram", "holds": "changes until shutdown (RAM)",
         "path": "/run/dmoverlay/live/cow", "used": MiB, "size": 64 * MiB, "state": "active",
         "percent": 1.56, "ram_free": GiB},
    ]
    assert s.to_dict()["layers"] == [layer.to_dict() for layer in s.layers()]


def test_a_persistent_overlay_has_no_ram_layer() -> None:
    s = Status("live", "/sysroot", "overflow", used=GiB, total=GiB, ram_free=None,
               mode="persistent", overlay="LABEL=STICK:/live.overlay", image="/dev/sr0")
    store = s.layers()[-1]
    assert [layer.kind for layer in s.layers()] == ["base", "store"]
    assert (store.path, store.used, store.size, store.state, store.percent) == (
        "LABEL=STICK:/live.overlay", GiB, GiB, "overflow", 100.0)
    assert s.layers()[0].size is None  # not read: not guessed


def test_a_readonly_store_sits_between_the_base_and_the_ram() -> None:
    s = Status("live", "/sysroot", "active", used=MiB, total=32 * MiB, ram_free=GiB,
               mode="readonly", overlay="/o", kept_used=4 * MiB, kept_total=16 * MiB,
               ram_copy=GiB, thin=True, cow_file="/run/c")
    base, store, ram = s.layers()
    assert base.holds == "the image, read-only, copied to RAM"
    assert (store.holds, store.used, store.size, store.state) == (
        "changes of earlier boots, shown read-only", 4 * MiB, 16 * MiB, None)
    assert (ram.holds, ram.used, ram.size) == ("changes until shutdown (thin pool)", MiB,
                                               32 * MiB)


@pytest.mark.parametrize(("table", "size"), [
    ("0 4194304 linear 7:0 0\n", 2 * GiB),
    ("0 8 linear 7:0 0\n8 8 linear 7:1 0\n", 8192),
    ("", None), ("8 8 linear 7:0 0\n", None), ("0 x linear\n", None), ("0 8\n", None),
])
def test_the_base_size_is_what_its_table_maps(table: str, size: int | None) -> None:
    assert table_size(table) == size
