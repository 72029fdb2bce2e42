"""Names, device-mapper tables, layouts and sizes: what an overlay is made of."""

from __future__ import annotations

import pytest

from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.dmtable import (
    Mode,
    Names,
    ThinPool,
    cow_file_size,
    layout,
    linear_table,
    snapshot_table,
    thin_sizes,
)


def test_names_follow_dracut() -> None:
    assert (Names().rw, Names().base) == ("live-rw", "live-base")
    assert Names("test2").rw == "test2-rw"
    for bad in ("", "a/b", "-x", "a b", "x" * 200):
        with pytest.raises(UsageError):
            Names(bad)


def test_tables() -> None:
    assert snapshot_table(sectors=4096, origin="/dev/loop1", cow="/dev/loop2") == \
        "0 4096 snapshot /dev/loop1 /dev/loop2 PO 8"
    assert linear_table(sectors=4096, device="/dev/loop1") == "0 4096 linear /dev/loop1 0"


def test_cow_file_is_whole_chunks() -> None:
    assert cow_file_size(GiB) == GiB
    assert cow_file_size(GiB + 100) == GiB
    assert cow_file_size(1) == 16 * 4096


def test_layout_of_each_mode() -> None:
    names = Names("live")
    ram = layout(names, sectors=800, base="/dev/loop1", mode=Mode.RAM, cow="/dev/loop2")
    assert [(d.name, d.table, d.read_only) for d in ram] == [
        ("live-base", "0 800 linear /dev/loop1 0", True),
        ("live-rw", "0 800 snapshot /dev/loop1 /dev/loop2 PO 8", False)]
    kept = layout(names, sectors=800, base="/dev/loop1", mode=Mode.PERSISTENT,
                  persistent="/dev/loop3")
    assert [d.table for d in kept][1:] == ["0 800 snapshot /dev/loop1 /dev/loop3 PO 8"]
    shown = layout(names, sectors=800, base="/dev/loop1", mode=Mode.READONLY,
                   persistent="/dev/loop3", cow="/dev/loop2")
    assert [(d.name, d.table, d.read_only) for d in shown][1:] == [
        ("live-ro", "0 800 snapshot /dev/loop1 /dev/loop3 P 8", True),
        ("live-rw", "0 800 snapshot /dev/mapper/live-ro /dev/loop2 PO 8", False)]


def test_thin_layout() -> None:
    pool = ThinPool("/dev/loop4", "/dev/loop5", 128 * 160)
    thin = layout(Names("x"), sectors=800, base="/dev/loop1", mode=Mode.RAM, thin=pool)
    assert [(d.name, d.table, d.messages) for d in thin][1:] == [
        ("x-overlay-pool", "0 20480 thin-pool /dev/loop4 /dev/loop5 128 16 1 error_if_no_space",
         ("create_thin 0",)),
        ("x-rw", "0 800 thin /dev/mapper/x-overlay-pool 0 /dev/loop1", ())]
    over_ro = layout(Names("x"), sectors=800, base="/dev/loop1", mode=Mode.READONLY,
                     persistent="/dev/loop3", thin=pool)
    assert over_ro[-1].table.endswith("0 /dev/mapper/x-ro")
    meta, data = thin_sizes(GiB + 1000)
    assert data == GiB and meta == GiB // 64
    assert thin_sizes(MiB) == (4 * MiB, MiB)


def test_layout_needs_its_devices() -> None:
    with pytest.raises(ValueError):
        layout(Names(), sectors=8, base="/dev/loop1", mode=Mode.PERSISTENT)
    with pytest.raises(ValueError):
        layout(Names(), sectors=8, base="/dev/loop1", mode=Mode.RAM)
