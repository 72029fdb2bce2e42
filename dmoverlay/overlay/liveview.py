"""A running overlay's two sides, mounted read-only for as long as they are
read (`mkupdates --from-live`): its base, the image as it was built, and
its live root, the filesystem of NAME-rw as the system changed it.

The state file names the overlay, and nothing more is taken from it: each
device is judged by what it is (a block device that device-mapper calls
NAME-base or NAME-rw), and the live root is found where the kernel says
NAME-rw is mounted (at the target setup mounted it on, or at / once the
boot has switched root to it).  The live root is a non-recursive bind: only
NAME-rw's filesystem is read, not /proc, /sys, /dev, /run or a /tmp
mounted on it.  Both mounts are read-only, nodev, nosuid and noexec (the
base also without replaying a journal), in a private directory in the
state directory, and are let go on every way out, SIGTERM included."""

from __future__ import annotations

import fcntl
import os
import re
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core.errors import OverlayError, UsageError
from dmoverlay.overlay import blockdev
from dmoverlay.overlay.dmtable import Names
from dmoverlay.overlay.media import fs_type
from dmoverlay.overlay.state import State, StepKind, load_state

MAPPER = Path("/dev/mapper")
SYS_DEV_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")
_VIEW = "ro,nodev,nosuid,noexec"
# a rootfs.img is ext4 (build), or an older ext3fs.img: read as it is,
# without replaying a journal, and an error never panics the kernel
_BASE_FS = {"ext4": ",noload,errors=remount-ro", "ext3": ",noload,errors=remount-ro",
            "ext2": ",errors=remount-ro"}
_ESCAPED = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Sides:
    """Where the base and the live root can be read, and a private
    directory off the live root for the reader's own scratch files."""

    base: Path
    live: Path
    scratch: Path


@contextmanager
def live_sides(state_dir: Path, name: str, *, writes: Sequence[Path] = ()) -> Iterator[Sides]:
    """The overlay NAME's base and live root, mounted read-only while the
    caller reads them.  `writes`: directories the caller writes in
    meanwhile, which may not be on the live root (what is written there
    would be read as a change).  OverlayError or UsageError before
    anything is mounted when the overlay is not one to read."""
    if os.geteuid() != 0:
        raise OverlayError("reading a live overlay needs root",
                           hint="run it as root: it mounts the overlay's devices read-only")
    found = overlay_devices(state_dir, name)
    names, base, base_dev, rw_dev = found.names, found.base, found.base_dev, found.rw_dev
    where = mounted_at(rw_dev, prefer=found.state.target)
    for path in (state_dir, *writes):  # the mount points are made in the state directory
        _check_elsewhere(path, rw_dev, names.rw)
    fstype, options = _base_fs(base)
    with ExitStack() as stack:
        # a leading dot: no overlay's name, so never the work directory of one
        top = Path(tempfile.mkdtemp(prefix=f".live-{name}-", dir=state_dir))
        stack.callback(os.rmdir, top)
        base_view = stack.enter_context(_mounted(base, top / "base", fstype, options))
        _check_view(base_view, base_dev, names.base)
        live_view = stack.enter_context(_mounted(where, top / "live", "none", "bind," + _VIEW))
        _check_view(live_view, rw_dev, names.rw)
        scratch = top / "scratch"
        scratch.mkdir(mode=0o700)
        stack.callback(os.rmdir, scratch)
        yield Sides(base_view, live_view, scratch)


@dataclass(frozen=True)
class Devices:
    """A running overlay's state, and its two devices judged."""

    state: State
    names: Names
    base: str
    base_dev: int
    rw: str
    rw_dev: int


def overlay_devices(state_dir: Path, name: str) -> Devices:
    """The overlay NAME as setup recorded it, complete, with NAME-base and
    NAME-rw each a device-mapper device of that name (OverlayError if not)."""
    state, _ = load_state(state_dir, name)
    names = Names(name)
    if not state.complete:
        raise OverlayError(f"the setup of {name!r} did not finish",
                           hint="tear it down and set it up again")
    recorded = {s.what for s in state.steps if s.kind is StepKind.DM}
    for dm in (names.base, names.rw):
        if dm not in recorded:
            raise OverlayError(f"the overlay {name!r} records no device {dm}",
                               hint="its state is not one setup wrote: look at it")
    base, base_dev = dm_device(names.base)
    rw, rw_dev = dm_device(names.rw)
    return Devices(state, names, base, base_dev, rw, rw_dev)


def dm_device(dm_name: str, *, mapper: Path = MAPPER,
              sys_block: Path = SYS_DEV_BLOCK) -> tuple[str, int]:
    """(the path, the device number) of the device-mapper device `dm_name`,
    judged by what it is, not by its name in /dev/mapper (a link, there, on
    many systems): a block device the kernel's device-mapper calls so."""
    path = os.fspath(mapper / dm_name)
    try:
        st = os.stat(path)
    except OSError:
        raise OverlayError(f"{path}: no such device",
                           hint="is the overlay still set up? (dmoverlay status)") from None
    if not stat.S_ISBLK(st.st_mode):
        raise OverlayError(f"{path}: not a block device", hint="something planted it there")
    node = sys_block / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" / "dm" / "name"
    try:
        called = node.read_text(errors="replace").removesuffix("\n")
    except OSError:
        raise OverlayError(f"{path}: not a device-mapper device",
                           hint="something planted it there") from None
    if called != dm_name:
        raise OverlayError(f"{path}: device-mapper calls it {called[:100]!r}, not {dm_name!r}",
                           hint="something planted it there")
    return path, st.st_rdev


def mounted_at(dev: int, *, prefer: str = "", mountinfo: Path = MOUNTINFO) -> str:
    """Where the filesystem on `dev` is mounted whole (its own top, not a
    bind of a directory in it), as the kernel says: `prefer` when it is one
    of those places, else the first."""
    found = [m.point for m in _mounts(mountinfo) if m.dev == dev and m.root == "/"]
    if not found:
        raise OverlayError(f"the live root (device {os.major(dev)}:{os.minor(dev)}) is not "
                           "mounted", hint="mount it, or set the overlay up again")
    return prefer if prefer in found else found[0]


@dataclass(frozen=True)
class _Mount:
    dev: int
    root: str  # the directory of the filesystem mounted there ("/": all of it)
    point: str
    options: tuple[str, ...]  # the mount's own (ro, nosuid, ...)


def _mounts(mountinfo: Path) -> list[_Mount]:
    """The kernel's mount table: `ID PARENT MAJ:MIN ROOT POINT OPTIONS ...`,
    paths with space, tab, newline and \\ written as \\ooo."""
    found = []
    for line in mountinfo.read_text(errors="surrogateescape").splitlines():
        fields = line.split(" ")
        if len(fields) < 6:
            continue
        major, _, minor = fields[2].partition(":")
        found.append(_Mount(os.makedev(int(major), int(minor)), _unescaped(fields[3]),
                            _unescaped(fields[4]), tuple(fields[5].split(","))))
    return found


def _unescaped(field: str) -> str:
    return _ESCAPED.sub(lambda m: chr(int(m[1], 8)), field)


def _check_elsewhere(path: Path, dev: int, dm_name: str) -> None:
    check_elsewhere(path, dev, dm_name, why="being read: what is written there would be "
                    "read as a change")


def check_elsewhere(path: Path, dev: int, dm_name: str, *, why: str) -> None:
    """UsageError if what is written in `path` would land on `dev`: its
    filesystem is on it, or on a device that stands on it (a loop over a
    file in it, a partition of such a loop, a device-mapper device over one)."""
    try:
        on = os.stat(path).st_dev
    except OSError as exc:
        raise UsageError(f"cannot write in {path}: {exc.strerror}") from None
    if on == dev:
        where = "is on"
    elif stands_on(on, dev):
        where = "is on a filesystem written through"
    else:
        return
    raise UsageError(f"{path} {where} the live root ({dm_name}) {why}",
                     hint="write it to another filesystem, such as /run (a tmpfs)")


def stands_on(dev: int, below: int, *, sysfs: Path = SYS_DEV_BLOCK) -> bool:
    """Whether block device `dev` writes, at some depth, to `below` (which
    may be a device or the filesystem on one), as sysfs tells."""
    return reaches(dev, below, lambda d: _under(d, sysfs))


def reaches(start: int, goal: int, under: Callable[[int], Iterable[int]]) -> bool:
    """Whether `goal` is `start` or found by following `under` from it; each
    device looked at once (a loop over a file on itself ends too)."""
    seen, todo = set(), [start]
    while todo:
        dev = todo.pop()
        if dev == goal:
            return True
        if dev not in seen:
            seen.add(dev)
            todo.extend(under(dev))
    return False


def _under(dev: int, sysfs: Path) -> list[int]:
    """What block device `dev` writes to: a loop, the filesystem of its
    file (or the device it is over); a partition, its disk; a device-mapper
    or md device, its slaves.  Nothing for what sysfs does not know (tmpfs,
    FUSE, NFS, overlayfs: no block device)."""
    node = sysfs / f"{os.major(dev)}:{os.minor(dev)}"
    found = []
    if (node / "loop").is_dir():
        backing = _loop_backing(dev, node)
        if backing is not None:
            found.append(backing)
    with suppress(OSError, ValueError):
        if (node / "partition").exists():
            found.append(_devno((node.resolve().parent / "dev").read_text()))
    with suppress(OSError, ValueError):
        for slave in (node / "slaves").iterdir():
            found.append(_devno((slave / "dev").read_text()))
    return found


LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("<QQQ")  # lo_device, lo_inode, lo_rdevice: the struct's head
_LOOP_INFO64_SIZE = 232


def _loop_backing(dev: int, node: Path) -> int | None:
    """What the loop device `dev` writes to: the device its file is on,
    or the block device it is over.  Asked of the loop device itself (its
    backing file's st_dev and st_rdev, kept by the kernel even for a file
    deleted since, or named in bytes sysfs cannot show), else from the
    path sysfs gives; None when neither tells."""
    with suppress(OSError, ValueError, StopIteration):
        name = next(line.split("=", 1)[1] for line in (node / "uevent").read_text().splitlines()
                    if line.startswith("DEVNAME="))
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if os.fstat(fd).st_rdev != dev:
                raise ValueError("another device at its name")
            info = bytearray(_LOOP_INFO64_SIZE)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        finally:
            os.close(fd)
        device, _, rdevice = _LOOP_INFO64.unpack_from(info)
        return _kernel_devno(rdevice or device)
    with suppress(OSError, ValueError):
        raw = (node / "loop/backing_file").read_bytes().removesuffix(b"\n")
        st = os.stat(raw)  # gone, or out of this namespace's sight: unknown
        return st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    return None


def _kernel_devno(value: int) -> int:
    """A device number as the kernel encodes it for ioctls (huge_encode_dev:
    minor's low byte, 12 bits of major, the rest of minor), as os.stat has it."""
    return os.makedev((value >> 8) & 0xFFF, (value & 0xFF) | ((value >> 12) & 0xFFF00))


def _devno(text: str) -> int:
    major, _, minor = text.strip().partition(":")
    return os.makedev(int(major), int(minor))


def _base_fs(device: str) -> tuple[str, str]:
    """(the filesystem type, the mount options) of the base."""
    found = fs_type(device)
    if found not in _BASE_FS:
        raise OverlayError(f"{device}: holds {found or 'no filesystem known here'}, not the "
                           "ext4 a rootfs.img holds")
    return found, _VIEW + _BASE_FS[found]


@contextmanager
def _mounted(what: str, where: Path, fstype: str, options: str) -> Iterator[Path]:
    """`what` mounted on the new directory `where`, unmounted on every way
    out: whether mount returned or not, since an interruption may come once
    the mount is made."""
    where.mkdir(mode=0o700)
    try:
        with blockdev.mounted(what, where, fstype=fstype, options=options):
            yield where
    finally:
        os.rmdir(where)


def _check_view(view: Path, dev: int, dm_name: str, *, mountinfo: Path = MOUNTINFO) -> None:
    """What `view` shows is all of the filesystem on `dev`, read-only, as the
    kernel's mount table says: what was judged may have changed before it
    was mounted (another device at /dev/mapper's name, something mounted on
    the live root, or a directory of it bound there)."""
    point = os.path.realpath(view)  # as the kernel names it
    shown = [m for m in _mounts(mountinfo) if m.point == point]
    if len(shown) != 1 or (shown[0].dev, shown[0].root) != (dev, "/") \
            or "ro" not in shown[0].options or not os.statvfs(view).f_flag & os.ST_RDONLY:
        raise OverlayError(f"could not show {dm_name}'s filesystem read-only at {view}",
                           hint="the mounts changed meanwhile: try again")
