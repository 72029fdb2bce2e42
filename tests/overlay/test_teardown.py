"""Teardown of planted or unfinished states: it removes only what setup made."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmoverlay.core.errors import OverlayError
from dmoverlay.overlay.state import State, Step, StepKind, load_state
from dmoverlay.overlay.teardown import release, teardown
from tests.overlay.statefiles import make_state, plant


def test_teardown_of_a_hostile_state_touches_nothing(tmp_path: Path) -> None:
    """A state file that an update dropped into the live /run (run/dmoverlay/
    live.json) named a directory of the system: teardown deleted it whole."""
    victim = tmp_path / "precious"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub/data").write_text("keep me\n")
    state_dir = tmp_path / "state"
    plant(state_dir, make_state(tmp_path, Step(StepKind.DIR, os.fspath(victim)),
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
    plant(state_dir, make_state(tmp_path, Step(StepKind.DIR, f"{work}"),
                                 Step(StepKind.DIR, f"{work}/squashfs"),
                                 Step(StepKind.DIR, f"{work}/cow")).to_json())
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
    # made, then the medium was full: nothing allocated (it was kept, on the
    # medium, for ever: found by a boot that asked for too big an overlay)
    empty = tmp_path / "empty.img"
    empty.touch()
    plant(state_dir, make_state(tmp_path, Step(StepKind.NEWFILE, os.fspath(fresh)),
                                 Step(StepKind.NEWFILE, os.fspath(data)),
                                 Step(StepKind.NEWFILE, os.fspath(empty)),
                                 complete=False).to_json())
    teardown(state_dir, "live")
    assert not fresh.exists() and not empty.exists()
    assert data.exists()


def test_steps_released_during_setup_leave_the_record_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The medium let go after a copy to RAM: each step undone, then dropped
    from the state on disk, so that a teardown later has nothing of it to undo
    (and the record never lacks what still exists)."""
    state_dir = tmp_path / "state"
    work = state_dir / "live"
    for sub in ("media1", "ram"):
        (work / sub).mkdir(parents=True)
    steps = [Step(StepKind.DIR, f"{work}"), Step(StepKind.DIR, f"{work}/media1"),
             Step(StepKind.MOUNT, f"{work}/media1"), Step(StepKind.DIR, f"{work}/ram")]
    path = plant(state_dir, make_state(tmp_path, *steps, complete=False).to_json())
    state, _ = load_state(state_dir, "live")
    saved: list[list[str]] = []
    real_save = State.save

    def noted(self: State, where: Path) -> None:
        real_save(self, where)
        saved.append([s.what for s in load_state(state_dir, "live")[0].steps])
    monkeypatch.setattr(State, "save", noted)
    release(state, path, state.steps[1:3])
    assert saved == [[f"{work}", f"{work}/media1", f"{work}/ram"], [f"{work}", f"{work}/ram"]]
    assert not (work / "media1").exists() and (work / "ram").is_dir()
    assert teardown(state_dir, "live") is not None
    assert not work.exists() and not path.exists()


def _mounts_at(where: Path) -> int:
    return sum(line.split()[1] == os.fspath(where)
               for line in Path("/proc/self/mounts").read_text().splitlines())


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/loop-control").exists(),
                    reason="mounts and loop devices need root")
def test_teardown_finds_mounts_moved_under_another_root(tmp_path: Path) -> None:
    """At shutdown dracut moves the old system's /run under /oldsys, with the
    mounts in it: the medium (here a tmpfs holding the overlay's file, on a
    loop device) is no longer where setup recorded it.  Teardown looked only
    there: the loop device stayed attached and the medium mounted, dirty at
    power-off.  With --moved-under, both are let go, the medium in every
    place it shows (here also a bind at the recorded place)."""
    state_dir = tmp_path / "run/dmoverlay"
    medium = state_dir / "live/medium"
    medium.mkdir(parents=True)
    state_dir.chmod(0o700)
    oldsys = tmp_path / "oldsys"
    moved = Path(f"{oldsys}{medium}")
    moved.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "medium", str(moved)], check=True)
    loop = ""
    try:
        (moved / "overlay.img").write_bytes(bytes(1 << 20))
        loop = subprocess.run(["losetup", "--show", "-f", str(moved / "overlay.img")],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "--bind", str(moved), str(medium)], check=True)
        plant(state_dir, make_state(tmp_path, Step(StepKind.DIR, f"{state_dir}/live"),
                                    Step(StepKind.DIR, f"{medium}"),
                                    Step(StepKind.MOUNT, f"{medium}"),
                                    Step(StepKind.LOOP, loop, f"{medium}/overlay.img")).to_json())
        assert teardown(state_dir, "live", moved_under=os.fspath(oldsys)) is not None
        assert not Path(f"/sys/block/{Path(loop).name}/loop").exists()
        assert _mounts_at(moved) == 0 and _mounts_at(medium) == 0
        assert not (state_dir / "live").exists()
        assert not (state_dir / "live.json").exists()
    finally:
        if loop and Path(f"/sys/block/{Path(loop).name}/loop").exists():
            subprocess.run(["losetup", "-d", loop], check=False)
        for where in (medium, moved):
            while _mounts_at(where):
                subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("where", ["relative", "/", "missing", "link"])
def test_moved_under_is_a_real_directory(tmp_path: Path, where: str) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    given = {"relative": "oldsys", "/": "/", "missing": f"{tmp_path}/missing",
             "link": f"{tmp_path}/link"}[where]
    with pytest.raises(OverlayError, match="not a directory named by its real, absolute path"):
        teardown(tmp_path / "state", "live", moved_under=given)
