"""The overlay's pure decisions: names, tables, sizes, specs, recorded state."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmoverlay import devspec, overlay
from dmoverlay.dmtable import Names, State, Step, cow_file_size, linear_table, snapshot_table
from dmoverlay.errors import DmoverlayError, UsageError
from dmoverlay.sizes import GiB, MiB


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
    assert overlay.ram_bytes("MemTotal:       24000000 kB\nMemFree: 1 kB\n") == 24000000 * 1024
    opts = overlay.SetupOptions(image="x", target=Path("/t"))
    assert overlay.overlay_size(opts, 8 * GiB) == 4 * GiB
    big = overlay.SetupOptions(image="x", target=Path("/t"), overlay_size=16 * GiB)
    assert overlay.overlay_size(big, 8 * GiB) == 16 * GiB
    assert "more than this machine's RAM" in capsys.readouterr().err
    with pytest.raises(UsageError):
        overlay.overlay_size(overlay.SetupOptions("x", Path("/t"), overlay_size=10), GiB)


def test_status_free_is_the_smaller_limit() -> None:
    s = overlay.Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=512 * MiB)
    assert s.free == 512 * MiB and s.percent == 25.0
    full = overlay.Status("live", "/sysroot", "overflow", used=0, total=0, ram_free=GiB)
    assert full.free == 0


def test_setup_refuses_without_root_or_snapshot(tmp_path: Path) -> None:
    opts = overlay.SetupOptions(image=str(tmp_path / "x.img"), target=tmp_path,
                                state_dir=tmp_path / "state")
    with pytest.raises(DmoverlayError):
        overlay.setup(opts)  # here: root, but no device-mapper (or not root elsewhere)
    assert not (tmp_path / "state").exists()


def test_loops_backed_by_reads_sysfs(tmp_path: Path) -> None:
    for n, backing in ((0, "/a/rootfs.img"), (3, "/b/cow"), (7, "/a/rootfs.img")):
        d = tmp_path / f"block/loop{n}/loop"
        d.mkdir(parents=True)
        (d / "backing_file").write_text(backing + "\n")
    assert overlay.loops_backed_by("/a/rootfs.img", sysfs=tmp_path) == ["/dev/loop0",
                                                                      "/dev/loop7"]
    assert overlay.loops_backed_by("/c", sysfs=tmp_path) == []
