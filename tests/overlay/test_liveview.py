"""A live overlay's base and root, mounted read-only while mkupdates reads
them.  The host has no device-mapper: two real ext4 images on loop devices
stand in for NAME-base and NAME-rw (dm_device, which judges a device by its
sysfs name, is tested on its own with a planted sysfs), the rest is real:
loop devices, mounts, mountinfo, the state file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.apply.update import ApplyOptions, apply_update
from dmoverlay.core import exits
from dmoverlay.core.errors import OverlayError, Terminated, UsageError
from dmoverlay.mkupdates.make import MkupdatesOptions, make_updates
from dmoverlay.overlay import blockdev, liveview
from dmoverlay.overlay.dmtable import Names
from dmoverlay.overlay.liveview import dm_device, live_sides, mounted_at
from dmoverlay.overlay.state import Step, StepKind
from tests.conftest import small_tmpfs
from tests.mkupdates.treekit import Node, build, snapshot
from tests.overlay.statefiles import make_state

BASE = {
    "etc": Node("dir", 0o755), "etc/app.conf": Node("file", 0o644, 0, b"x=1\n"),
    "etc/gone": Node("file", 0o644, 0, b"old\n"),
    "usr": Node("dir", 0o755), "usr/lib": Node("dir", 0o755),
    "usr/lib/libfoo.so.1": Node("file", 0o755, 0, b"libfoo\n"),
    "tmp": Node("dir", 0o1777),
}


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """An overlay `live` as setup leaves it, but with loop devices for its
    dm devices: the base image read-only, a copy of it mounted at the
    target, and the state file naming both."""
    build(tmp_path / "tree", BASE)
    base_img = tmp_path / "base.img"
    _sh("mkfs.ext4", "-q", "-F", "-d", str(tmp_path / "tree"), str(base_img), "8M")
    shutil.copyfile(base_img, tmp_path / "rw.img")
    base = _sh("losetup", "--find", "--show", "--read-only", str(base_img))
    rw = _sh("losetup", "--find", "--show", str(tmp_path / "rw.img"))
    names = Names("live")
    devices = {names.base: (base, os.stat(base).st_rdev), names.rw: (rw, os.stat(rw).st_rdev)}
    monkeypatch.setattr(liveview, "dm_device", lambda name: devices[name])
    target = tmp_path / "sysroot"
    target.mkdir()
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    make_state(tmp_path, Step(StepKind.DM, names.base), Step(StepKind.DM, names.rw),
               Step(StepKind.MOUNT, os.fspath(target))).save(state_dir / "live.json")
    _sh("mount", "-t", "ext4", rw, str(target))
    try:
        yield {"top": tmp_path, "target": target, "state": state_dir, "tree": tmp_path / "tree"}
    finally:
        subprocess.run(["umount", str(target)], check=False)
        subprocess.run(["losetup", "--detach", rw], check=False)
        subprocess.run(["losetup", "--detach", base], check=False)


def _mounts_under(path: Path) -> list[str]:
    top = os.fspath(path)
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(top)]


def _left_in(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if p.name != "live.json")


def _change(target: Path) -> None:
    """A fix tried on the live system: a changed file, a new one, a deleted
    one, a symlink, a new directory."""
    (target / "etc/app.conf").write_bytes(b"x=2\n")
    (target / "etc/new.conf").write_bytes(b"new\n")
    (target / "etc/gone").unlink()
    os.symlink("libfoo.so.1", target / "usr/lib/libfoo.so")
    (target / "opt/tool").mkdir(parents=True)
    (target / "opt/tool/run").write_bytes(b"#!/bin/sh\n")
    os.chmod(target / "opt/tool/run", 0o755)


def _entries(top: Path) -> dict[str, object]:
    seen, groups = snapshot(top)
    return {"entries": {k: v for k, v in seen.items() if not k.startswith("lost+found")},
            "groups": groups}


@pytest.mark.root
def test_the_base_with_the_update_is_the_live_root(live: dict[str, Path]) -> None:
    """What was changed under the target, and only that, goes in; applied
    to a copy of the base it gives the live view, entry by entry.  A tmpfs
    mounted on the live root is not read (the bind is not recursive)."""
    _change(live["target"])
    out = live["top"] / "u.img"
    tmp = live["target"] / "tmp"
    _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp))
    try:
        (tmp / "junk").write_bytes(b"not the root's\n")
        with live_sides(live["state"], "live", writes=[out.parent]) as sides:
            made = make_updates(MkupdatesOptions(new=str(sides.live), old=str(sides.base),
                                                 output=out))
    finally:
        _sh("umount", str(tmp))
    assert made.lines() == [
        "file\tetc/app.conf", "whiteout\tetc/gone", "file\tetc/new.conf",
        "dir\topt", "dir\topt/tool", "file\topt/tool/run", "symlink\tusr/lib/libfoo.so"]
    copy = live["top"] / "copy"
    shutil.copytree(live["tree"], copy, symlinks=True)
    (live["top"] / "run").mkdir()
    apply_update(str(out), ApplyOptions(root=copy, run_dir=live["top"] / "run"))
    assert _entries(copy) == _entries(live["target"])
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
def test_a_dry_run_writes_its_scratch_off_the_live_root(
        live: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Even where the temporary directory is on the live root (no tmpfs
    on /tmp)."""
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(live["target"] / "tmp"))
    with live_sides(live["state"], "live") as sides:
        assert sides.scratch.parent.parent == live["state"]
        made = make_updates(MkupdatesOptions(new=str(sides.live), old=str(sides.base),
                                             output=None, scratch=sides.scratch))
    assert made.lines() == []  # nothing changed: nothing of the scratch read as a change
    assert _left_in(live["state"]) == []


@pytest.mark.root
def test_both_views_are_read_only_and_let_go_on_sigterm(live: dict[str, Path]) -> None:
    previous = signal.signal(signal.SIGTERM, exits.on_sigterm)  # as the CLI does
    try:
        with pytest.raises(Terminated), live_sides(live["state"], "live") as sides:
            for view in (sides.base, sides.live):
                with pytest.raises(OSError):
                    (view / "etc/written").write_bytes(b"")
                assert os.statvfs(view).f_flag & os.ST_RDONLY
                assert os.statvfs(view).f_flag & os.ST_NOSUID
            assert len(_mounts_under(live["state"])) == 2
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
def test_a_failed_bind_lets_the_base_go(live: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = blockdev.mount

    def mount(device: str, where: Path, *, fstype: str, options: str = "") -> None:
        if fstype == "none":
            raise OverlayError("injected: the bind fails")
        real(device, where, fstype=fstype, options=options)

    monkeypatch.setattr(blockdev, "mount", mount)
    with pytest.raises(OverlayError, match="injected"), live_sides(live["state"], "live"):
        pass
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
@pytest.mark.parametrize("elsewhere", ["another filesystem", "a directory of the live root"])
def test_a_bind_of_something_else_is_refused_and_let_go(
        live: dict[str, Path], monkeypatch: pytest.MonkeyPatch, elsewhere: str) -> None:
    """The mount table changed between reading it and binding: what the
    bind shows is judged by the kernel's mount table (all of live-rw's
    filesystem), not by where it came from."""
    with small_tmpfs(live["top"] / "other", "size=1m") as other:
        source = other if elsewhere == "another filesystem" else live["target"] / "etc"
        monkeypatch.setattr(liveview, "mounted_at", lambda dev, prefer: os.fspath(source))
        with pytest.raises(OverlayError, match="could not show live-rw's filesystem"), \
                live_sides(live["state"], "live"):
            pass
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
def test_a_base_that_is_not_the_device_judged_is_refused_and_let_go(
        live: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/mapper/NAME-base judged, then another device there when it is
    mounted: what is mounted is judged again, by the kernel's mount table."""
    judged = liveview.dm_device
    rw = judged("live-rw")
    monkeypatch.setattr(liveview, "dm_device",
                        lambda name: (judged(name)[0], rw[1]) if name == "live-base" else rw)
    with pytest.raises(OverlayError, match="could not show live-base's filesystem"), \
            live_sides(live["state"], "live"):
        pass
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
def test_the_output_may_not_be_on_the_live_root(live: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="is on the live root"), \
            live_sides(live["state"], "live", writes=[live["target"] / "etc"]):
        pass
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
def test_the_output_may_not_be_on_a_filesystem_written_through_the_live_root(
        live: dict[str, Path]) -> None:
    """A filesystem mounted from an image file on the live root has another
    device number, but every write to it changes that file."""
    disk = live["target"] / "disk.img"
    _sh("mkfs.ext4", "-q", "-F", str(disk), "4M")
    loop = _sh("losetup", "--find", "--show", str(disk))
    out = live["top"] / "out"
    out.mkdir()
    _sh("mount", loop, str(out))
    try:
        with pytest.raises(UsageError, match="is on a filesystem written through the live "
                           r"root \(live-rw\)"), live_sides(live["state"], "live", writes=[out]):
            pass
    finally:
        subprocess.run(["umount", str(out)], check=True)
        subprocess.run(["losetup", "--detach", loop], check=True)
    with live_sides(live["state"], "live", writes=[out]):  # the same directory, off it now
        pass
    assert _mounts_under(live["state"]) == [] and _left_in(live["state"]) == []


@pytest.mark.root
def test_a_live_root_not_mounted_is_one_error(live: dict[str, Path]) -> None:
    subprocess.run(["umount", str(live["target"])], check=True)
    with pytest.raises(OverlayError, match=r"the live root \(device .*\) is not mounted"), \
            live_sides(live["state"], "live"):
        pass
    assert _left_in(live["state"]) == []


@pytest.mark.root
@pytest.mark.parametrize("steps, complete, why", [
    ([Step(StepKind.DM, "live-rw")], True, "records no device live-base"),
    ([Step(StepKind.DM, "live-base")], True, "records no device live-rw"),
    ([Step(StepKind.DM, "live-base"), Step(StepKind.DM, "live-rw")], False, "did not finish"),
])
def test_a_state_naming_no_overlay_to_read_is_refused(
        tmp_path: Path, steps: list[Step], complete: bool, why: str) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    make_state(tmp_path, *steps, complete=complete).save(state_dir / "live.json")
    with pytest.raises(OverlayError, match=why), live_sides(state_dir, "live"):
        pass
    assert _left_in(state_dir) == []


# ---------------------------------------------------------------- the device, by what it is

@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "disk").write_bytes(bytes(1 << 20))
    dev = _sh("losetup", "--find", "--show", "--read-only", str(tmp_path / "disk"))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def _plant_sysfs(top: Path, dev: str, name: str | None) -> Path:
    rdev = os.stat(dev).st_rdev
    node = top / "sys" / f"{os.major(rdev)}:{os.minor(rdev)}"
    node.mkdir(parents=True)
    if name is not None:
        (node / "dm").mkdir()
        (node / "dm/name").write_text(name + "\n")
    return top / "sys"


@pytest.mark.root
def test_a_device_mapper_device_is_judged_by_its_sysfs_name(tmp_path: Path, loop: str) -> None:
    mapper = tmp_path / "mapper"
    mapper.mkdir()
    os.symlink(loop, mapper / "live-base")  # /dev/mapper/X is a link on many systems
    sys_block = _plant_sysfs(tmp_path, loop, "live-base")
    assert dm_device("live-base", mapper=mapper, sys_block=sys_block) == (
        os.fspath(mapper / "live-base"), os.stat(loop).st_rdev)


@pytest.mark.root
@pytest.mark.parametrize("planted, sysfs_name, why", [
    ("file", "live-base", "not a block device"),
    ("missing", "live-base", "no such device"),
    ("loop", None, "not a device-mapper device"),
    ("loop", "live-rw", "device-mapper calls it 'live-rw', not 'live-base'"),
])
def test_a_device_that_is_not_the_one_named_is_refused(
        tmp_path: Path, loop: str, planted: str, sysfs_name: str | None, why: str) -> None:
    mapper = tmp_path / "mapper"
    mapper.mkdir()
    if planted == "file":
        (mapper / "live-base").write_bytes(b"")
    elif planted == "loop":
        os.symlink(loop, mapper / "live-base")
    sys_block = _plant_sysfs(tmp_path, loop, sysfs_name)
    with pytest.raises(OverlayError, match=why):
        dm_device("live-base", mapper=mapper, sys_block=sys_block)


def test_where_a_device_is_mounted_is_read_from_mountinfo(tmp_path: Path) -> None:
    """Only mounts of the whole filesystem count (a bind of a directory in
    it does not); the kernel's escapes undone; the target preferred."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 1 253:2 /var /srv/var rw - ext4 /dev/mapper/live-rw rw\n"
        "31 1 253:2 / /sysroot\\040root rw - ext4 /dev/mapper/live-rw rw\n"
        "32 1 253:3 / /other rw - ext4 /dev/mapper/x rw\n"
        "33 1 253:2 / / rw - ext4 /dev/mapper/live-rw rw\n")
    dev = os.makedev(253, 2)
    assert mounted_at(dev, mountinfo=info) == "/sysroot root"
    assert mounted_at(dev, prefer="/", mountinfo=info) == "/"
    assert mounted_at(dev, prefer="/srv/var", mountinfo=info) == "/sysroot root"
    with pytest.raises(OverlayError, match="not mounted"):
        mounted_at(os.makedev(253, 9), mountinfo=info)
