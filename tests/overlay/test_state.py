"""The state file: what setup records, read back as hostile input (a name
that leaves the state directory, a link, a fifo, steps setup would not record)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dmoverlay.core.errors import DmoverlayError, OverlayError
from dmoverlay.core.sizes import GiB
from dmoverlay.overlay.state import State, Step, StepKind, check_state, load_state
from tests.overlay.statefiles import make_state, plant


def test_state_round_trip(tmp_path: Path) -> None:
    state = State("live", "/sysroot", "LABEL=x", GiB,
                  steps=[Step(StepKind.LOOP, "/dev/loop3", "/a")])
    state.save(tmp_path / "live.json")
    assert State.from_json((tmp_path / "live.json").read_text()) == state


def test_old_state_files_still_load() -> None:
    old = '{"name": "live", "target": "/t", "image": "i", "overlay_size": 1, "steps": []}'
    state = State.from_json(old)
    assert (state.mode, state.overlay, state.thin) == ("ram", "", False)


def _setup_like(top: Path) -> State:
    """The steps a RAM-overlay setup records."""
    work = top / "state/live"
    return make_state(top, Step(StepKind.DIR, f"{work}"), Step(StepKind.DIR, f"{work}/squashfs"),
                       Step(StepKind.LOOP, "/dev/loop0", backing="/media/LiveOS/squashfs.img"),
                       Step(StepKind.MOUNT, f"{work}/squashfs"),
                       Step(StepKind.LOOP, "", backing="/x/rootfs.img"),
                       Step(StepKind.DIR, f"{work}/cow"), Step(StepKind.MOUNT, f"{work}/cow"),
                       Step(StepKind.FILE, f"{work}/cow/live.cow"), Step(StepKind.DM, "live-base"),
                       Step(StepKind.DM, "live-rw"), Step(StepKind.MOUNT, f"{top}/sysroot"),
                       Step(StepKind.NEWFILE, "/media/overlay.img"))


def test_a_state_as_setup_records_it_passes(tmp_path: Path) -> None:
    check_state(_setup_like(tmp_path), tmp_path / "state", "live")


@pytest.mark.parametrize("step", [
    Step(StepKind.DIR, "/"), Step(StepKind.DIR, "{work}/../.."), Step(StepKind.DIR, "{work}/.."),
    Step(StepKind.DIR, "{work}/a/b"), Step(StepKind.MOUNT, "/etc"), Step(StepKind.DM, "root"),
    Step(StepKind.LOOP, "/dev/sda"), Step(StepKind.LOOP, "", backing="relative"),
    Step(StepKind.FILE, "/etc/shadow"), Step(StepKind.FILE, "{work}/cow/other.cow"),
    Step(StepKind.FILE, "/etc/../srv/live.cow"),
    Step(StepKind.NEWFILE, "relative.img"), Step("exec", "rm -rf /"),  # type: ignore[arg-type]
    Step(["dir"], "/"),  # type: ignore[arg-type]
    Step(StepKind.DIR, 7),  # type: ignore[arg-type]
])
def test_a_step_setup_would_not_record_is_refused(tmp_path: Path, step: Step) -> None:
    step.what = step.what.replace("{work}", f"{tmp_path}/state/live") \
        if isinstance(step.what, str) else step.what
    with pytest.raises(ValueError, match="step"):
        check_state(make_state(tmp_path, step), tmp_path / "state", "live")


def test_a_state_of_another_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names the overlay 'other'"):
        check_state(make_state(tmp_path, name="other"), tmp_path / "state", "live")


@pytest.mark.parametrize("case", ["link", "dir link", "open dir", "fifo", "huge", "garbage",
                                  "bad field", "name", "deep"])
def test_state_files_that_are_not_setups_are_refused(tmp_path: Path, case: str) -> None:
    state_dir = tmp_path / "state"
    good = make_state(tmp_path).to_json()
    name = "live"
    if case == "link":
        (tmp_path / "elsewhere.json").write_text(good)
        state_dir.mkdir(mode=0o700)
        (state_dir / "live.json").symlink_to(tmp_path / "elsewhere.json")
    elif case == "dir link":
        (tmp_path / "real").mkdir(mode=0o700)
        plant(tmp_path / "real", good)
        state_dir.symlink_to(tmp_path / "real")
    elif case == "open dir":
        plant(state_dir, good)
        state_dir.chmod(0o777)
    elif case == "fifo":
        state_dir.mkdir(mode=0o700)
        os.mkfifo(state_dir / "live.json")  # must not hang
    elif case == "huge":
        plant(state_dir, good[:-1] + " " * (2 << 20) + "}")
    elif case == "garbage":
        plant(state_dir, "[1, 2")
    elif case == "deep":  # under the size limit, past the parser's recursion limit
        plant(state_dir, "[" * 100_000 + "]" * 100_000)
    elif case == "bad field":
        assert '"complete": true' in good
        plant(state_dir, good.replace('"complete": true', '"complete": "yes"'))
    else:
        plant(state_dir, good)
        name = "../state/live"
    with pytest.raises(DmoverlayError) as exc:
        load_state(state_dir, name)
    assert "\n" not in exc.value.message


def test_state_saved_over_a_planted_link_does_not_write_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "live.tmp").symlink_to(victim)
    make_state(tmp_path).save(tmp_path / "live.json")
    assert victim.read_text() == "keep me\n"
    assert State.from_json((tmp_path / "live.json").read_text()) == make_state(tmp_path)


def test_step_kinds_of_a_state_file_load_as_kinds(tmp_path: Path) -> None:
    """State files hold the kinds as the words they always held ("dir",
    "loop"...): those written before StepKind load, as members."""
    text = _setup_like(tmp_path).to_json()
    words = [step["kind"] for step in json.loads(text)["steps"]]
    assert words[:5] == ["dir", "dir", "loop", "mount", "loop"]
    plant(tmp_path / "state", text)
    state, _ = load_state(tmp_path / "state", "live")
    assert [step.kind for step in state.steps] == words
    assert all(isinstance(step.kind, StepKind) for step in state.steps)


@pytest.mark.parametrize("kind", ['"exec"', '["dir"]', "7", "null", '"DIR"'])
def test_a_step_of_unknown_kind_in_a_state_file_is_one_line(tmp_path: Path, kind: str) -> None:
    good = make_state(tmp_path, Step(StepKind.DM, "live-rw")).to_json()
    assert '"kind": "dm"' in good
    plant(tmp_path / "state", good.replace('"kind": "dm"', f'"kind": {kind}'))
    with pytest.raises(OverlayError, match="unknown kind") as exc:
        load_state(tmp_path / "state", "live")
    assert "\n" not in exc.value.message and exc.value.hint


def _ram_setup_like(top: Path) -> State:
    """The steps a --ram setup leaves recorded: the medium's steps released
    (gone from the record), the copy's tmpfs and loop in their place."""
    work = top / "state/live"
    state = make_state(top, Step(StepKind.DIR, f"{work}"), Step(StepKind.DIR, f"{work}/ram"),
                       Step(StepKind.MOUNT, f"{work}/ram"),
                       Step(StepKind.LOOP, "/dev/loop1", backing=f"{work}/ram/squashfs.img"),
                       Step(StepKind.DIR, f"{work}/squashfs"),
                       Step(StepKind.MOUNT, f"{work}/squashfs"),
                       Step(StepKind.LOOP, "/dev/loop2",
                            backing=f"{work}/squashfs/LiveOS/rootfs.img"),
                       Step(StepKind.DM, "live-base"), Step(StepKind.DM, "live-rw"),
                       Step(StepKind.MOUNT, f"{top}/sysroot"))
    state.ram_copy = 1 << 30
    return state


def test_a_ram_setup_as_recorded_passes_and_loads(tmp_path: Path) -> None:
    state = _ram_setup_like(tmp_path)
    check_state(state, tmp_path / "state", "live")
    plant(tmp_path / "state", state.to_json())
    assert load_state(tmp_path / "state", "live")[0] == state


@pytest.mark.parametrize("value", ["/run/initramfs/squashed.img", True, -1, 1.5, None, [1]])
def test_a_ram_copy_that_is_not_a_size_is_refused(tmp_path: Path, value: object) -> None:
    text = _ram_setup_like(tmp_path).to_json()
    assert '"ram_copy": 1073741824' in text
    plant(tmp_path / "state", text.replace('"ram_copy": 1073741824', f'"ram_copy": '
                                           f'{json.dumps(value)}'))
    with pytest.raises(OverlayError, match="ram_copy is not a size") as exc:
        load_state(tmp_path / "state", "live")
    assert "\n" not in exc.value.message


@pytest.mark.parametrize("step", [
    Step(StepKind.MOUNT, "/run/initramfs/live"),  # dracut's medium: not ours to unmount
    Step(StepKind.DIR, "/run/initramfs"),
    Step(StepKind.MOUNT, "{work}/ram/../../../../x"),
    Step(StepKind.LOOP, "/dev/sr0", backing="/run/initramfs/squashed.img"),
])
def test_a_ram_state_naming_a_foreign_path_is_refused(tmp_path: Path, step: Step) -> None:
    step.what = step.what.replace("{work}", f"{tmp_path}/state/live")
    state = _ram_setup_like(tmp_path)
    state.steps.insert(3, step)
    with pytest.raises(ValueError, match="step setup would not record"):
        check_state(state, tmp_path / "state", "live")


# ---------------------------------------------------------------- the medium

def _with_medium(top: Path) -> State:
    """A setup that mounted the medium in its work directory, as find_rootfs does."""
    work = top / "state/live"
    state = make_state(top, Step(StepKind.DIR, f"{work}"), Step(StepKind.DIR, f"{work}/media0"),
                       Step(StepKind.MOUNT, f"{work}/media0"), Step(StepKind.DM, "live-rw"),
                       Step(StepKind.MOUNT, f"{top}/sysroot"))
    state.medium = f"{work}/media0"
    return state


def test_the_medium_round_trips(tmp_path: Path) -> None:
    state = _with_medium(tmp_path)
    plant(tmp_path / "state", state.to_json())
    loaded, _ = load_state(tmp_path / "state", "live")
    assert loaded == state and loaded.medium == f"{tmp_path}/state/live/media0"


def test_a_state_of_before_the_medium_loads_without_one(tmp_path: Path) -> None:
    data = json.loads(_with_medium(tmp_path).to_json())
    del data["medium"]
    plant(tmp_path / "state", json.dumps(data))
    assert load_state(tmp_path / "state", "live")[0].medium == ""


@pytest.mark.parametrize("medium", [
    "/", "/etc", "/run/initramfs/live", "{work}/media1", "{work}/media0/..", "{work}",
    "{work}/media0/", "relative",
])
def test_a_medium_that_is_not_a_mount_of_the_state_is_refused(tmp_path: Path,
                                                              medium: str) -> None:
    text = _with_medium(tmp_path).to_json()
    recorded = f'"medium": "{tmp_path}/state/live/media0"'
    assert recorded in text
    planted = medium.replace("{work}", f"{tmp_path}/state/live")
    plant(tmp_path / "state", text.replace(recorded, f'"medium": {json.dumps(planted)}'))
    with pytest.raises(OverlayError, match="not a mount point setup made") as exc:
        load_state(tmp_path / "state", "live")
    assert "\n" not in exc.value.message and exc.value.hint


@pytest.mark.parametrize("value", [True, 1, None, ["/x"], {"a": 1}])
def test_a_medium_that_is_not_a_string_is_refused(tmp_path: Path, value: object) -> None:
    text = _with_medium(tmp_path).to_json()
    recorded = f'"medium": "{tmp_path}/state/live/media0"'
    plant(tmp_path / "state", text.replace(recorded, f'"medium": {json.dumps(value)}'))
    with pytest.raises(OverlayError, match="its medium is not a path") as exc:
        load_state(tmp_path / "state", "live")
    assert "\n" not in exc.value.message
