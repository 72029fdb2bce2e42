"""The checks setup makes without starting a program (sysfs read instead of
dmsetup, which costs more than the check itself at boot), on a made-up sysfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmoverlay.core.errors import DmoverlayError
from dmoverlay.overlay.errors import OverlayError
from dmoverlay.overlay.kernel import (
    _module_present,
    dm_exists,
    fs_module,
    has_filesystem,
    require_filesystem,
    require_loop,
)
from dmoverlay.overlay.state import State, Step, check_state, load_state
from dmoverlay.overlay.teardown import teardown


def _dm(sysfs: Path, index: int, name: str) -> None:
    (sysfs / f"block/dm-{index}/dm").mkdir(parents=True)
    (sysfs / f"block/dm-{index}/dm/name").write_text(f"{name}\n")


def test_dm_exists_by_name(tmp_path: Path) -> None:
    _dm(tmp_path, 0, "live-rw")
    _dm(tmp_path, 3, "live-base")
    (tmp_path / "block/loop0").mkdir()
    assert dm_exists("live-rw", tmp_path)
    assert dm_exists("live-base", tmp_path)
    assert not dm_exists("live", tmp_path)  # a prefix is not the name
    assert not dm_exists("live-ro", tmp_path)


def test_module_present(tmp_path: Path) -> None:
    (tmp_path / "module/dm_snapshot").mkdir(parents=True)
    control = tmp_path / "control"
    assert not _module_present("dm-snapshot", tmp_path, control)  # no device-mapper at all
    control.touch()
    assert _module_present("dm-snapshot", tmp_path, control)
    assert not _module_present("dm-thin-pool", tmp_path, control)  # then dmsetup decides


FILESYSTEMS = "nodev\tsysfs\nnodev\ttmpfs\n\text4\n\tsquashfs\nnodev\tfuse\n\tfuseblk\n"


def test_has_filesystem_reads_proc_filesystems() -> None:
    assert has_filesystem("ext4", FILESYSTEMS)
    assert has_filesystem("tmpfs", FILESYSTEMS)  # a nodev one
    assert not has_filesystem("fuseblk2", FILESYSTEMS)
    assert not has_filesystem("fuse", "\tfuseblk\n")  # a prefix is not the name
    assert not has_filesystem("iso9660", FILESYSTEMS)


def test_filesystem_modules() -> None:
    assert fs_module("iso9660") == "isofs"
    assert fs_module("ext3") == "ext4"
    assert fs_module("squashfs") == "squashfs"


def test_missing_filesystem_is_one_line(tmp_path: Path) -> None:
    proc = tmp_path / "filesystems"
    proc.write_text(FILESYSTEMS)
    require_filesystem("ext4", proc)
    with pytest.raises(OverlayError, match="no nosuchfs filesystem") as exc:
        require_filesystem("nosuchfs", proc)  # modprobe tries, and finds no such module
    assert exc.value.hint is not None and "modprobe nosuchfs" in exc.value.hint


def test_missing_loop_control_is_one_line(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dmoverlay.overlay.kernel._modprobe", lambda module: None)
    monkeypatch.setattr("dmoverlay.overlay.kernel.time.sleep", lambda seconds: None)
    monkeypatch.setattr("dmoverlay.overlay.kernel._ready", set())
    with pytest.raises(OverlayError, match="no loop devices"):
        require_loop(tmp_path / "loop-control")
    (tmp_path / "loop-control").touch()
    require_loop(tmp_path / "loop-control")


# ------------------------------------------------------------------ state files


def _state(top: Path, *steps: Step, name: str = "live", complete: bool = True) -> State:
    return State(name, os.fspath(top / "sysroot"), "LABEL=LIVE", 1 << 30, steps=list(steps),
                 complete=complete)


def _setup_like(top: Path) -> State:
    """The steps a RAM-overlay setup records."""
    work = top / "state/live"
    return _state(top, Step("dir", f"{work}"), Step("dir", f"{work}/squashfs"),
                  Step("loop", "/dev/loop0", backing="/media/LiveOS/squashfs.img"),
                  Step("mount", f"{work}/squashfs"), Step("loop", "", backing="/x/rootfs.img"),
                  Step("dir", f"{work}/cow"), Step("mount", f"{work}/cow"),
                  Step("file", f"{work}/cow/live.cow"), Step("dm", "live-base"),
                  Step("dm", "live-rw"), Step("mount", f"{top}/sysroot"),
                  Step("newfile", "/media/overlay.img"))


def test_a_state_as_setup_records_it_passes(tmp_path: Path) -> None:
    check_state(_setup_like(tmp_path), tmp_path / "state", "live")


@pytest.mark.parametrize("step", [
    Step("dir", "/"), Step("dir", "{work}/../.."), Step("dir", "{work}/.."),
    Step("dir", "{work}/a/b"), Step("mount", "/etc"), Step("dm", "root"),
    Step("loop", "/dev/sda"), Step("loop", "", backing="relative"),
    Step("file", "/etc/shadow"), Step("file", "{work}/cow/other.cow"),
    Step("file", "/etc/../srv/live.cow"),
    Step("newfile", "relative.img"), Step("exec", "rm -rf /"),
    Step(["dir"], "/"),  # type: ignore[arg-type]
    Step("dir", 7),  # type: ignore[arg-type]
])
def test_a_step_setup_would_not_record_is_refused(tmp_path: Path, step: Step) -> None:
    step.what = step.what.replace("{work}", f"{tmp_path}/state/live") \
        if isinstance(step.what, str) else step.what
    with pytest.raises(ValueError, match="step"):
        check_state(_state(tmp_path, step), tmp_path / "state", "live")


def test_a_state_of_another_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names the overlay 'other'"):
        check_state(_state(tmp_path, name="other"), tmp_path / "state", "live")


def _plant(state_dir: Path, text: str, name: str = "live") -> Path:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    path = state_dir / f"{name}.json"
    path.write_text(text)
    return path


def test_teardown_of_a_hostile_state_touches_nothing(tmp_path: Path) -> None:
    """A state file that an update dropped into the live /run (run/dmoverlay/
    live.json) named a directory of the system: teardown deleted it whole."""
    victim = tmp_path / "precious"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub/data").write_text("keep me\n")
    state_dir = tmp_path / "state"
    _plant(state_dir, _state(tmp_path, Step("dir", os.fspath(victim)),
                             complete=False).to_json())
    with pytest.raises(OverlayError, match=r"unreadable state .*dir step setup would not"):
        teardown(state_dir, "live")
    assert (victim / "sub/data").read_text() == "keep me\n"
    assert (state_dir / "live.json").exists()  # kept for a person to look at


def test_teardown_removes_only_empty_directories_it_made(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    work = state_dir / "live"
    (work / "squashfs").mkdir(parents=True)
    (work / "cow").mkdir()
    (work / "cow/someone-elses").write_text("x")
    _plant(state_dir, _state(tmp_path, Step("dir", f"{work}"), Step("dir", f"{work}/squashfs"),
                             Step("dir", f"{work}/cow")).to_json())
    assert teardown(state_dir, "live") is not None
    assert not (work / "squashfs").exists()
    assert (work / "cow/someone-elses").read_text() == "x"
    assert not (state_dir / "live.json").exists()


def test_unfinished_setup_deletes_its_overlay_file_only_if_it_holds_a_store(
        tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    fresh, data = tmp_path / "fresh.img", tmp_path / "data.img"
    fresh.write_bytes(bytes(1 << 16))  # as setup makes it: allocated, zero
    data.write_bytes(b"\x53\xef" * 40000)  # someone's data now at that name
    _plant(state_dir, _state(tmp_path, Step("newfile", os.fspath(fresh)),
                             Step("newfile", os.fspath(data)), complete=False).to_json())
    teardown(state_dir, "live")
    assert not fresh.exists()
    assert data.exists()


@pytest.mark.parametrize("case", ["link", "dir link", "open dir", "fifo", "huge", "garbage",
                                  "bad field", "name", "deep"])
def test_state_files_that_are_not_setups_are_refused(tmp_path: Path, case: str) -> None:
    state_dir = tmp_path / "state"
    good = _state(tmp_path).to_json()
    name = "live"
    if case == "link":
        (tmp_path / "elsewhere.json").write_text(good)
        state_dir.mkdir(mode=0o700)
        (state_dir / "live.json").symlink_to(tmp_path / "elsewhere.json")
    elif case == "dir link":
        (tmp_path / "real").mkdir(mode=0o700)
        _plant(tmp_path / "real", good)
        state_dir.symlink_to(tmp_path / "real")
    elif case == "open dir":
        _plant(state_dir, good)
        state_dir.chmod(0o777)
    elif case == "fifo":
        state_dir.mkdir(mode=0o700)
        os.mkfifo(state_dir / "live.json")  # must not hang
    elif case == "huge":
        _plant(state_dir, good[:-1] + " " * (2 << 20) + "}")
    elif case == "garbage":
        _plant(state_dir, "[1, 2")
    elif case == "deep":  # under the size limit, past the parser's recursion limit
        _plant(state_dir, "[" * 100_000 + "]" * 100_000)
    elif case == "bad field":
        assert '"complete": true' in good
        _plant(state_dir, good.replace('"complete": true', '"complete": "yes"'))
    else:
        _plant(state_dir, good)
        name = "../state/live"
    with pytest.raises(DmoverlayError) as exc:
        load_state(state_dir, name)
    assert "\n" not in exc.value.message


def test_state_saved_over_a_planted_link_does_not_write_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "live.tmp").symlink_to(victim)
    _state(tmp_path).save(tmp_path / "live.json")
    assert victim.read_text() == "keep me\n"
    assert State.from_json((tmp_path / "live.json").read_text()) == _state(tmp_path)
