"""The overlay's pure decisions: names, tables, layouts, sizes, specs, persistent
stores, recorded state."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest

from dmoverlay.core.cow import PoolStatus, parse_pool_status
from dmoverlay.core.errors import DmoverlayError, ImageError, UsageError
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay import devspec, persistent
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
from dmoverlay.overlay.kernel import loops_backed_by
from dmoverlay.overlay.options import SetupOptions, check_options, overlay_size, ram_bytes
from dmoverlay.overlay.setup import setup
from dmoverlay.overlay.state import State, Step
from dmoverlay.overlay.status import Status


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


def test_state_round_trip(tmp_path: Path) -> None:
    state = State("live", "/sysroot", "LABEL=x", GiB, steps=[Step("loop", "/dev/loop3", "/a")])
    state.save(tmp_path / "live.json")
    assert State.from_json((tmp_path / "live.json").read_text()) == state


@pytest.mark.parametrize(("text", "key", "value"), [
    ("LABEL=Fedora-Live", "LABEL", "Fedora-Live"),
    ("live:CDLABEL=Fedora\\x20WS", "LABEL", "Fedora WS"),
    ("UUID=1234-ABCD", "UUID", "1234-ABCD"),
    ("PARTUUID=0fc63daf-8483", "PARTUUID", "0fc63daf-8483"),
    ("PARTLABEL=LIVE", "PARTLABEL", "LIVE"),
])
def test_device_specs(text: str, key: str, value: str) -> None:
    spec = devspec.parse(text)
    assert spec is not None and (spec.key, spec.value) == (key, value)


def test_paths_are_not_specs() -> None:
    assert devspec.parse("/run/media/squashfs.img") is None
    assert devspec.parse("./dir=with=equals/x.img") is None


@pytest.mark.parametrize("text", ["LABEL=", "SERIAL=123"])
def test_bad_specs(text: str) -> None:
    with pytest.raises(UsageError):
        devspec.parse(text)


def test_spec_matching_nothing() -> None:
    spec = devspec.parse("LABEL=dmoverlay-no-such-label")
    assert spec is not None
    with pytest.raises(UsageError, match="no device matches"):
        devspec.resolve(spec)


def test_overlay_size_defaults_to_half_the_ram_and_warns_past_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert ram_bytes("MemTotal:       24000000 kB\nMemFree: 1 kB\n") == 24000000 * 1024
    opts = SetupOptions(image="x", target=Path("/t"))
    assert overlay_size(opts, 8 * GiB) == 4 * GiB
    big = SetupOptions(image="x", target=Path("/t"), overlay_size=16 * GiB)
    assert overlay_size(big, 8 * GiB) == 16 * GiB
    assert "more than this machine's RAM" in capsys.readouterr().err
    with pytest.raises(UsageError):
        overlay_size(SetupOptions("x", Path("/t"), overlay_size=10), GiB)


def test_status_free_is_the_smaller_limit() -> None:
    s = Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=512 * MiB)
    assert s.free == 512 * MiB and s.percent == 25.0
    full = Status("live", "/sysroot", "overflow", used=0, total=0, ram_free=GiB)
    assert full.free == 0


def test_setup_refuses_without_root_or_snapshot(tmp_path: Path) -> None:
    opts = SetupOptions(image=str(tmp_path / "x.img"), target=tmp_path,
                                state_dir=tmp_path / "state")
    with pytest.raises(DmoverlayError):
        setup(opts)  # here: root, but no device-mapper (or not root elsewhere)
    assert not (tmp_path / "state").exists()


def test_loops_backed_by_reads_sysfs(tmp_path: Path) -> None:
    for n, backing in ((0, "/a/rootfs.img"), (3, "/b/cow"), (7, "/a/rootfs.img")):
        d = tmp_path / f"block/loop{n}/loop"
        d.mkdir(parents=True)
        (d / "backing_file").write_text(backing + "\n")
    assert loops_backed_by("/a/rootfs.img", sysfs=tmp_path) == ["/dev/loop0",
                                                                      "/dev/loop7"]
    assert loops_backed_by("/c", sysfs=tmp_path) == []


# ------------------------------------------------------------------ persistent overlays


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


@pytest.mark.parametrize(("text", "device", "path"), [
    ("LABEL=LIVE:/LiveOS/overlay-LIVE", "LABEL=LIVE", "/LiveOS/overlay-LIVE"),
    ("UUID=12-ab:/a//b/", "UUID=12-ab", "/a/b"),
    ("PARTLABEL=LIVE-overlay", "PARTLABEL=LIVE-overlay", None),
    ("CDLABEL=X:auto", "CDLABEL=X", None),
    ("/dev/sdb2:/overlay", "/dev/sdb2", "/overlay"),
    ("/dev/sdb2", "/dev/sdb2", None),
    ("/dev/disk/by-path/pci-0000:00:1f.2-part2", "/dev/disk/by-path/pci-0000:00:1f.2-part2",
     None),
    ("/dev/disk/by-path/pci-0000:00:1f.2-part2:/o", "/dev/disk/by-path/pci-0000:00:1f.2-part2",
     "/o"),
    ("fs.img:/LiveOS/o", "fs.img", "/LiveOS/o"),
    ("/var/tmp/live.overlay", None, "/var/tmp/live.overlay"),
    ("./a=b/overlay", None, "./a=b/overlay"),
])
def test_overlay_specs(text: str, device: str | None, path: str | None) -> None:
    spec = persistent.parse_spec(text)
    assert (spec.device, spec.path) == (device, path)


@pytest.mark.parametrize("text", ["", "LABEL=:/x", "LABEL=X:relative", "/dev/sdb:/a/../b",
                                  "LABEL=X:/.."])
def test_bad_overlay_specs(text: str) -> None:
    with pytest.raises(UsageError):
        persistent.parse_spec(text)


def test_auto_path_is_dracuts() -> None:
    assert persistent.auto_path("LiveOS", "LIVE", "1234") == "/LiveOS/overlay-LIVE-1234"
    assert persistent.auto_path("LiveOS", "", "1234") == "/LiveOS/overlay--1234"
    with pytest.raises(UsageError, match="neither"):  # an image file: no medium to name
        persistent.auto_path("LiveOS", "", "")


def _header(magic: bytes = b"SnAp", valid: int = 1, version: int = 1, chunk: int = 8) -> bytes:
    return magic + struct.pack("<III", valid, version, chunk) + bytes(4080)


def test_store_headers() -> None:
    assert persistent.read_header(bytes(4096), where="f").state is persistent.Store.NEW
    assert persistent.read_header(_header(chunk=16), where="f") == \
        persistent.StoreHeader(persistent.Store.VALID, 16)
    cases = {
        "not a snapshot overlay store (unknown content)": _header(magic=b"junk"),
        "marked this overlay store invalid": _header(valid=0),
        "unsupported snapshot store": _header(version=2),
        "chunk size 12 sectors": _header(chunk=12),
        "too short": b"SnAp",
    }
    for words, head in cases.items():
        with pytest.raises(ImageError, match=re.escape(words)):
            persistent.read_header(head, where="f")
    ext = bytearray(4096)  # ext4 starts with a zero boot block: a zero magic
    ext[1024 + 0x38:1024 + 0x3A] = b"\x53\xef"
    with pytest.raises(ImageError, match="holds ext data") as info:
        persistent.read_header(bytes(ext), where="f")
    assert info.value.hint and "--overlay-reset" in info.value.hint
    with pytest.raises(ImageError, match="holds xfs data"):
        persistent.read_header(bytes(4096), where="f", probed="xfs")
    assert persistent.read_header(_header(), where="f", probed="DM_snapshot_cow").state is \
        persistent.Store.VALID


def test_store_sizes() -> None:
    persistent.check_size(64 * MiB, wanted=None, where="f")
    persistent.check_size(64 * MiB, wanted=64 * MiB, where="f")
    with pytest.raises(UsageError, match="not the --overlay-size"):
        persistent.check_size(64 * MiB, wanted=128 * MiB, where="f")
    with pytest.raises(ImageError, match="too small"):
        persistent.check_size(4096, wanted=None, where="f")
    with pytest.raises(ImageError, match="whole number of sectors"):
        persistent.check_size(MiB + 100, wanted=None, where="f")
    assert persistent.new_size(64 * MiB + 5, where="f") == 64 * MiB
    with pytest.raises(UsageError, match="no such overlay file") as info:
        persistent.new_size(None, where="f")
    assert info.value.hint and "--overlay-size" in info.value.hint
    with pytest.raises(UsageError, match="too small"):
        persistent.new_size(1000, where="f")


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"overlay_reset": True}, "--overlay-reset needs --overlay"),
    ({"overlay_readonly": True}, "--overlay-readonly needs --overlay"),
    ({"overlay": "/o", "overlay_reset": True, "overlay_readonly": True}, "contradict"),
    ({"overlay": "/o", "overlay_thin": True}, "--overlay-thin with --overlay needs"),
    ({"overlay": "/o", "tmpfs_dir": Path("/t")}, "--tmpfs-dir means nothing"),
    ({"overlay": "LABEL=:/x"}, "empty device spec"),
])
def test_option_combinations_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        check_options(SetupOptions("x", Path("/t"), **kwargs))


def test_modes_and_accepted_combinations() -> None:
    def opts(**kwargs: Any) -> SetupOptions:
        return SetupOptions("x", Path("/t"), **kwargs)
    assert opts().mode is Mode.RAM
    assert opts(overlay="/o").mode is Mode.PERSISTENT
    assert opts(overlay="/o", overlay_readonly=True).mode is Mode.READONLY
    for ok in (opts(overlay_thin=True), opts(overlay="/o", overlay_readonly=True,
                                             overlay_thin=True),
               opts(overlay="/o", overlay_reset=True), opts(overlay="LABEL=A:/o")):
        check_options(ok)


def test_old_state_files_still_load() -> None:
    old = '{"name": "live", "target": "/t", "image": "i", "overlay_size": 1, "steps": []}'
    state = State.from_json(old)
    assert (state.mode, state.overlay, state.thin) == ("ram", "", False)
