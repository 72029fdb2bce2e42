"""The checks setup makes without starting a program (sysfs read instead of
dmsetup, which costs more than the check itself at boot), on a made-up sysfs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dmoverlay.core.errors import OverlayError
from dmoverlay.overlay.kernel import (
    _module_present,
    dm_exists,
    fs_module,
    has_filesystem,
    loops_backed_by,
    require_filesystem,
    require_loop,
    udev_running,
)


def test_loops_backed_by_reads_sysfs(tmp_path: Path) -> None:
    for n, backing in ((0, "/a/rootfs.img"), (3, "/b/cow"), (7, "/a/rootfs.img")):
        d = tmp_path / f"block/loop{n}/loop"
        d.mkdir(parents=True)
        (d / "backing_file").write_text(backing + "\n")
    assert loops_backed_by("/a/rootfs.img", sysfs=tmp_path) == ["/dev/loop0",
                                                                      "/dev/loop7"]
    assert loops_backed_by("/c", sysfs=tmp_path) == []


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


def test_udev_is_running_only_when_its_socket_answers(tmp_path: Path) -> None:
    """At shutdown udevd is gone and its control socket stays: dmsetup,
    which goes by the file, waited for udev for ever, and the machine never
    powered off.  What counts is an answer."""
    control = tmp_path / "control"
    assert not udev_running(str(control))  # no socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(str(control))
        sock.listen(1)
        assert udev_running(str(control))
    assert control.exists()  # what udevd leaves behind
    assert not udev_running(str(control))
