"""What the kernel has and shows: device-mapper targets, the loop driver
and filesystems (their modules loaded where needed), and the devices it
knows of, read from sysfs and /proc rather than by starting a program: at
boot, a process start costs more than the check itself."""

from __future__ import annotations

import os
import stat
import time
from contextlib import suppress
from pathlib import Path

from dmoverlay.core.errors import OverlayError
from dmoverlay.core.run import find_tool, run


def require_root() -> None:
    if os.geteuid() != 0:
        raise OverlayError("setting up an overlay needs root",
                           hint="run it as root (at boot, the initramfs is)")


def require_target(target: str = "snapshot", module: str = "dm-snapshot",
                   config: str = "CONFIG_DM_SNAPSHOT") -> None:
    """A device-mapper target in the kernel, loading its module if need be."""
    if find_tool("dmsetup") is None:
        raise OverlayError("dmsetup not found", hint="apt-get install dmsetup")
    if _module_present(module):
        return  # loaded, or built in (it has parameters): no program to start
    if not _has_target(target):
        _modprobe(module)
        if not _has_target(target):
            raise OverlayError(
                f"this kernel has no device-mapper {target} target ({module})",
                hint=f"load it (modprobe {module}) or use a kernel with {config}; "
                     "dmoverlay doctor says what is missing")


def _module_present(module: str, sysfs: Path = Path("/sys"),
                    control: Path = Path("/dev/mapper/control")) -> bool:
    """Whether the kernel has a target's module now, by sysfs: a process
    start (dmsetup targets) costs more than the rest of a check, at boot."""
    return control.exists() and (sysfs / "module" / module.replace("-", "_")).is_dir()


def _has_target(target: str) -> bool:
    if not Path("/dev/mapper/control").exists():
        return False
    result = run(["dmsetup", "targets"], check=False)
    return result.returncode == 0 and any(
        line.split()[:1] == [target] for line in result.stdout.splitlines())


# Filesystems whose module has another name (ext2/3 are served by ext4's).
_FS_MODULES = {"iso9660": "isofs", "ext2": "ext4", "ext3": "ext4"}
LOOP_CONTROL = Path("/dev/loop-control")


def fs_module(fstype: str) -> str:
    return _FS_MODULES.get(fstype, fstype)


def has_filesystem(fstype: str, filesystems: str) -> bool:
    """Whether /proc/filesystems (its text) lists `fstype`."""
    return any(line.split()[-1:] == [fstype] for line in filesystems.splitlines())


_ready: set[str] = set()  # kernel parts found or loaded by this process


def require_loop(control: Path = LOOP_CONTROL) -> None:
    """The loop driver, loaded if it is a module not loaded yet: a bare
    initramfs has no static device nodes, and opening /dev/loop-control does
    not load the module there."""
    if "loop" in _ready or control.exists():
        _ready.add("loop")
        return
    _modprobe("loop")
    for _ in range(40):  # devtmpfs makes the node at once; udev, where it runs, soon
        if control.exists():
            _ready.add("loop")
            return
        time.sleep(0.05)
    raise OverlayError(f"this kernel has no loop devices ({control} is missing)",
                       hint="load the loop module (modprobe loop) or use a kernel with "
                            "CONFIG_BLK_DEV_LOOP; dmoverlay doctor says what is missing")


def require_filesystem(fstype: str, proc: Path = Path("/proc/filesystems")) -> None:
    """A filesystem in the kernel before it is mounted, its module loaded if
    need be (the kernel's own module request needs a usermode helper that a
    bare initramfs may lack)."""
    if fstype in _ready or has_filesystem(fstype, proc.read_text()):
        _ready.add(fstype)
        return
    _modprobe(fs_module(fstype))
    if not has_filesystem(fstype, proc.read_text()):
        raise OverlayError(f"this kernel has no {fstype} filesystem",
                           hint=f"load its module (modprobe {fs_module(fstype)}) or use a "
                                "kernel that has it; dmoverlay doctor says what is missing")
    _ready.add(fstype)


def _modprobe(module: str) -> None:
    if find_tool("modprobe") is not None:
        run(["modprobe", module], check=False)


# ------------------------------------------------------------------ devices


def dm_exists(name: str, sysfs: Path = Path("/sys")) -> bool:
    """A device-mapper device of that name, by sysfs (no dmsetup to start)."""
    for entry in sysfs.glob("block/dm-*/dm/name"):
        with suppress(OSError):
            if entry.read_text().strip() == name:
                return True
    return False


UDEV_CONTROL = "/run/udev/control"


def udev_running(control: str = UDEV_CONTROL) -> bool:
    """Whether udevd answers on its control socket.  The socket file alone
    says nothing: at shutdown udevd is gone and its socket stays, and
    dmsetup, which goes by the file, then waits for udev for ever."""
    import socket  # teardown's alone: not in setup's start-up

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(control)
        except OSError:
            return False
    return True


def dm_remove_argv(name: str) -> list[str]:
    """dmsetup's command to remove a device: without udev, dmsetup itself
    removes the node (what dracut's dm shutdown hook does too)."""
    return ["dmsetup", "remove", name] if udev_running() else \
        ["dmsetup", "--noudevsync", "remove", name]


def loops_backed_by(backing: str, *, sysfs: Path = Path("/sys")) -> list[str]:
    """Loop devices attached to a file (a setup killed before it noted which)."""
    found = []
    for path in sorted(sysfs.glob("block/loop*/loop/backing_file")):
        with suppress(OSError):
            if path.read_text().strip() == backing:
                found.append(f"/dev/{path.parent.parent.name}")
    return found


def is_block(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def device_sectors(dev: str) -> int:
    name = os.path.basename(os.path.realpath(dev))
    return int(Path(f"/sys/class/block/{name}/size").read_text())


def mounted_at(rdev: int) -> str:
    devno = f"{os.major(rdev)}:{os.minor(rdev)}"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[2] == devno:
            return fields[4]
    return ""
