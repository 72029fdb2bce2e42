"""Teardown of planted or unfinished states: it removes only what setup made."""

from __future__ import annotations

import os
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
    plant(state_dir, make_state(tmp_path, Step(StepKind.NEWFILE, os.fspath(fresh)),
                                 Step(StepKind.NEWFILE, os.fspath(data)), complete=False).to_json())
    teardown(state_dir, "live")
    assert not fresh.exists()
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
