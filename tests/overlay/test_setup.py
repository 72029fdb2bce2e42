"""Setup on a host without device-mapper: refused before anything is made;
and, as root, the copy to RAM up to the device-mapper step: the medium let
go before it, everything unwound after a failure there."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmoverlay.core.errors import DmoverlayError, OverlayError
from dmoverlay.core.sizes import MiB
from dmoverlay.overlay import ramcopy
from dmoverlay.overlay import setup as setup_code
from dmoverlay.overlay.dmtable import Device
from dmoverlay.overlay.options import SetupOptions, parse_image, parse_overlay
from dmoverlay.overlay.recorder import Recorder
from dmoverlay.overlay.setup import medium_in_use, setup
from dmoverlay.overlay.state import State, Step, StepKind, load_state
from tests.conftest import loop_backings


def test_setup_refuses_without_root_or_snapshot(tmp_path: Path) -> None:
    opts = SetupOptions(image=parse_image(str(tmp_path / "x.img")), target=tmp_path,
                        state_dir=tmp_path / "state")
    with pytest.raises(DmoverlayError):
        setup(opts)  # here: root, but no device-mapper (or not root elsewhere)
    assert not (tmp_path / "state").exists()


def test_what_stands_on_the_medium_keeps_it(tmp_path: Path) -> None:
    media = tmp_path / "state/live/media2"
    medium = [Step(StepKind.LOOP, "/dev/loop4", backing=f"{tmp_path}/disk.img"),
              Step(StepKind.DIR, f"{media}"), Step(StepKind.MOUNT, f"{media}")]
    copy = [Step(StepKind.LOOP, "/dev/loop5", backing=f"{tmp_path}/state/live/ram/squashfs.img")]
    assert not medium_in_use(medium, copy)
    for store in (Step(StepKind.LOOP, "/dev/loop6", backing=f"{media}/LiveOS/overlay-X-Y"),
                  Step(StepKind.NEWFILE, f"{media}/LiveOS/overlay.img"),
                  Step(StepKind.NEWFILE, f"{media}/sub/../o.img")):
        assert medium_in_use(medium, [*copy, store])
    beside = Step(StepKind.LOOP, "/dev/loop6", backing=f"{media}-other/o.img")
    assert not medium_in_use(medium, [*copy, beside])


# ------------------------------------------------------------------ as root, on loop devices


def _medium(top: Path) -> Path:
    """An ext4 medium holding LiveOS/squashfs.img holding LiveOS/rootfs.img,
    as a live stick's partition."""
    (top / "tree/etc").mkdir(parents=True)
    (top / "tree/etc/os-release").write_text("NAME=Sample\n")
    (top / "squash/LiveOS").mkdir(parents=True)
    (top / "media/LiveOS").mkdir(parents=True)

    def run(*argv: object) -> None:
        subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    run("mkfs.ext4", "-q", "-F", "-d", top / "tree", top / "squash/LiveOS/rootfs.img", "4M")
    run("mksquashfs", top / "squash", top / "media/LiveOS/squashfs.img", "-quiet", "-noappend")
    run("mkfs.ext4", "-q", "-F", "-L", "DMORAM", "-d", top / "media", top / "medium.img", "16M")
    return top / "medium.img"


def _loops(top: Path) -> dict[str, str]:
    """The loop devices backed by files under `top`: only this test's (a
    suite running beside it makes and frees its own meanwhile)."""
    return {name: backing for name, backing in loop_backings().items()
            if backing.startswith(f"{top}/")}


def _mounts_under(top: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{top}/")]


class Stop(OverlayError):
    """Where the host's kernel, without device-mapper, ends the setup."""


@pytest.fixture
def at_device_mapper(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Setup runs up to its first device-mapper device; there it fails (the
    host has no device-mapper), after noting what existed at that moment."""
    seen: dict[str, Any] = {}

    def dm(rec: Recorder, device: Device) -> str:
        seen.update(loops=_loops(tmp_path), state=load_state(rec.path.parent, rec.state.name)[0])
        raise Stop("no device-mapper on this host")
    monkeypatch.setattr(setup_code, "require_target", lambda *args: None)
    monkeypatch.setattr(Recorder, "dm", dm)
    yield seen


def _opts(tmp_path: Path, image: str, **kwargs: Any) -> SetupOptions:
    (tmp_path / "target").mkdir(exist_ok=True)
    return SetupOptions(parse_image(image), tmp_path / "target", state_dir=tmp_path / "state",
                        ram=True, **kwargs)


@pytest.mark.root
def test_ram_copies_the_image_then_lets_the_medium_go(tmp_path: Path,
                                                      at_device_mapper: dict[str, Any]) -> None:
    medium = _medium(tmp_path)
    before = _loops(tmp_path)
    with pytest.raises(Stop):
        setup(_opts(tmp_path, str(medium), overlay_size=16 * MiB))
    state: State = at_device_mapper["state"]
    loops: dict[str, str] = at_device_mapper["loops"]
    work = tmp_path / "state/live"
    squash = (tmp_path / "media/LiveOS/squashfs.img").stat().st_size
    # at the device-mapper step: the medium's loop detached, nothing of it in the state
    assert os.fspath(medium) not in loops.values()
    assert f"{work}/ram/squashfs.img" in loops.values()
    assert state.ram_copy == squash and state.overlay_size == 16 * MiB
    assert not any("media" in s.what or s.backing == os.fspath(medium) for s in state.steps)
    assert [s.kind for s in state.steps[:4]] == ["dir", "dir", "mount", "loop"]
    # failed there: everything unwound, the copy with its tmpfs
    assert _loops(tmp_path) == before
    assert _mounts_under(tmp_path) == []
    assert not (tmp_path / "state/live.json").exists() and not work.exists()


@pytest.mark.root
def test_a_copy_that_fails_unwinds_everything(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              at_device_mapper: dict[str, Any]) -> None:
    medium = _medium(tmp_path)
    before = _loops(tmp_path)
    real = ramcopy.copy_image

    def cut(source: str, dest: Path, size: int) -> None:
        real(source, dest, size // 2)  # half copied, then the medium is gone
        raise OverlayError(f"cannot copy {source} to RAM: it ends after {size // 2} bytes")
    monkeypatch.setattr(setup_code, "copy_image", cut)
    with pytest.raises(OverlayError, match="ends after"):
        setup(_opts(tmp_path, str(medium), overlay_size=16 * MiB))
    assert _loops(tmp_path) == before
    assert _mounts_under(tmp_path) == []
    assert not (tmp_path / "state/live").exists()


@pytest.mark.root
def test_ram_that_does_not_fit_copies_nothing(tmp_path: Path,
                                              at_device_mapper: dict[str, Any]) -> None:
    medium = _medium(tmp_path)
    before = _loops(tmp_path)
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    with pytest.raises(OverlayError, match="not enough RAM to copy the image") as caught:
        setup(_opts(tmp_path, str(medium), overlay_size=total))
    assert "--overlay-size" in (caught.value.hint or "")
    assert _loops(tmp_path) == before and _mounts_under(tmp_path) == []


@pytest.fixture
def medium_device(tmp_path: Path) -> Iterator[str]:
    dev = subprocess.run(["losetup", "--find", "--show", str(_medium(tmp_path))],
                         capture_output=True, text=True, check=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True)


@pytest.mark.root
def test_a_persistent_overlay_on_the_medium_keeps_it(tmp_path: Path, medium_device: str,
                                                     at_device_mapper: dict[str, Any]) -> None:
    """As on a stick made by livecd-iso-to-disk: the image is read from RAM,
    the overlay file stays on the medium, which stays mounted for it."""
    before = _loops(tmp_path)
    with pytest.raises(Stop):
        setup(_opts(tmp_path, medium_device, overlay=parse_overlay(
            f"{medium_device}:/LiveOS/overlay.img"), overlay_size=8 * MiB))
    state: State = at_device_mapper["state"]
    media = [s for s in state.steps if s.kind is StepKind.MOUNT and "media" in s.what]
    assert len(media) == 1
    assert state.ram_copy > 0
    assert any(s.backing == f"{media[0].what}/LiveOS/overlay.img" for s in state.steps)
    assert _loops(tmp_path) == before and _mounts_under(tmp_path) == []
