"""`dmoverlay setup / status / teardown`: the boot-time overlay, as dracut's
dmsquash-live makes it, on real loop devices and device-mapper.

Every attach is recorded in a state file under /run before the next one,
so teardown undoes exactly what exists, after a clean setup or a crash."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from dmoverlay import blockdev, cow, devspec, log
from dmoverlay.dmtable import (
    SECTOR,
    Names,
    State,
    Step,
    cow_file_size,
    linear_table,
    snapshot_table,
)
from dmoverlay.errors import DmoverlayError, ImageError, UsageError
from dmoverlay.run import find_tool, run
from dmoverlay.sizes import MiB, format_size
from dmoverlay.superblock import Kind, detect, parse_ext4, parse_squashfs

STATE_DIR = Path("/run/dmoverlay")
ROOTFS_NAMES = ("rootfs.img", "ext3fs.img")  # dracut's order


class OverlayError(DmoverlayError):
    """Setup, status or teardown could not be done."""


@dataclass(frozen=True)
class SetupOptions:
    image: str
    target: Path
    name: str = "live"
    overlay_size: int | None = None  # None: half the RAM
    live_dir: str = "LiveOS"
    squashfs_name: str = "squashfs.img"
    tmpfs_dir: Path | None = None  # an existing tmpfs for the COW file; else our own
    state_dir: Path = STATE_DIR


# ------------------------------------------------------------------ checks


def require_root() -> None:
    if os.geteuid() != 0:
        raise OverlayError("setting up an overlay needs root",
                           hint="run it as root (at boot, the initramfs is)")


def require_snapshot_target() -> None:
    """dm-snapshot in the kernel, loading the module if need be."""
    if find_tool("dmsetup") is None:
        raise OverlayError("dmsetup not found", hint="apt-get install dmsetup")
    if not _has_snapshot():
        if find_tool("modprobe") is not None:
            run(["modprobe", "dm-snapshot"], check=False)
        if not _has_snapshot():
            raise OverlayError(
                "this kernel has no device-mapper snapshot target (dm-snapshot)",
                hint="load it (modprobe dm-snapshot) or use a kernel with CONFIG_DM_SNAPSHOT; "
                     "dmoverlay doctor says what is missing")


def _has_snapshot() -> bool:
    if not Path("/dev/mapper/control").exists():
        return False
    result = run(["dmsetup", "targets"], check=False)
    return result.returncode == 0 and any(
        line.split()[:1] == ["snapshot"] for line in result.stdout.splitlines())


def ram_bytes(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OverlayError("cannot read MemTotal from /proc/meminfo")


def overlay_size(opts: SetupOptions, ram: int) -> int:
    size = opts.overlay_size if opts.overlay_size is not None else ram // 2
    if size < MiB:
        raise UsageError(f"overlay size {format_size(size)} is too small", hint="give 1M or more")
    if size > ram:
        log.info(f"warning: overlay of {format_size(size)} is more than this machine's RAM "
                 f"({format_size(ram)}): writes fail once RAM runs out, before the COW is full")
    return size


def check_target(target: Path) -> None:
    if not target.is_dir():
        raise UsageError(f"{target}: not a directory", hint="create the mount point first")
    if any(target.iterdir()):
        raise UsageError(f"{target}: not an empty directory", hint="mount the overlay elsewhere")
    if os.path.ismount(target):
        raise UsageError(f"{target}: something is mounted there already")


# ------------------------------------------------------------------ recording


class Recorder:
    """Attach things, each recorded (and saved) before it is attached: a setup
    killed at any point leaves nothing that teardown does not know of."""

    def __init__(self, state: State, path: Path) -> None:
        self.state = state
        self.path = path
        self.state.save(path)

    def add(self, step: Step) -> Step:
        self.state.steps.append(step)
        self.state.save(self.path)
        return step

    def mkdir(self, path: Path) -> Path:
        # made first, noted after: never remove a directory that was not ours
        path.mkdir(mode=0o700)
        self.add(Step("dir", os.fspath(path)))
        return path

    def loop(self, file: str, *, read_only: bool, offset: int = 0, size: int = 0) -> str:
        # the device is known only once attached: until then its backing file
        # is what teardown looks for
        step = self.add(Step("loop", "", backing=os.path.realpath(file)))
        step.what = blockdev.loop_setup(file, read_only=read_only, offset=offset, size=size)
        self.state.save(self.path)
        return step.what

    def mount(self, device: str, where: Path, *, fstype: str, options: str) -> Path:
        self.add(Step("mount", os.fspath(where)))
        blockdev.mount(device, where, fstype=fstype, options=options)
        return where

    def dm(self, name: str, table: str, *, read_only: bool) -> str:
        self.add(Step("dm", name))
        argv = ["dmsetup", "create", name, "--table", table]
        run([*argv, "--readonly"] if read_only else argv)
        node = Path("/dev/mapper") / name
        for _ in range(100):  # udev, where it runs, makes the node a moment later
            if node.exists():
                return os.fspath(node)
            time.sleep(0.05)
        raise OverlayError(f"{node} did not appear")


# ------------------------------------------------------------------ setup


def state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def setup(opts: SetupOptions) -> State:
    require_root()
    names = Names(opts.name)
    check_target(opts.target)
    require_snapshot_target()
    size = overlay_size(opts, ram_bytes(Path("/proc/meminfo").read_text()))
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_path(opts.state_dir, opts.name)
    if path.exists() or _dm_exists(names.rw) or _dm_exists(names.base):
        raise UsageError(f"an overlay named {opts.name!r} exists already",
                         hint="tear it down first, or give --name")
    rec = Recorder(State(opts.name, os.fspath(opts.target), opts.image, size), path)
    try:
        _setup(rec, opts, names, size)
    except BaseException:
        _unwind(rec.state, path)
        raise
    rec.state.complete = True
    rec.state.save(path)
    return rec.state


def _setup(rec: Recorder, opts: SetupOptions, names: Names, size: int) -> None:
    work = rec.mkdir(opts.state_dir / opts.name)
    with log.step(f"finding the root filesystem in {opts.image}"):
        rootfs = _find_rootfs(rec, opts, work)
    with log.step("attaching rootfs.img read-only"):
        base = rec.loop(os.fspath(rootfs), read_only=True)
        _check_ext(base, rootfs)
        sectors = _sectors(base)
    with log.step(f"making a {format_size(size)} COW store in RAM"):
        cow_file = _cow_file(rec, opts, work, size)
        cow_dev = rec.loop(os.fspath(cow_file), read_only=False)
    with log.step(f"creating {names.rw} and {names.base}"):
        rec.dm(names.base, linear_table(sectors=sectors, device=base), read_only=True)
        rw = rec.dm(names.rw, snapshot_table(sectors=sectors, origin=base, cow=cow_dev),
                    read_only=False)
    with log.step(f"mounting {names.rw} on {opts.target}"):
        rec.mount(rw, opts.target, fstype="ext4", options="")


def _find_rootfs(rec: Recorder, opts: SetupOptions, work: Path) -> Path:
    """Follow the image down to LiveOS/rootfs.img, mounting what is on the way."""
    spec = devspec.parse(opts.image)
    source = devspec.resolve(spec) if spec else opts.image
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file or device")
    kind = _kind_of(source)
    if kind is Kind.EXT and not _holds(source, opts):
        return Path(source)  # a rootfs.img itself
    if kind is Kind.SQUASHFS:
        return _in_squashfs(rec, opts, work, source)
    media = _media(rec, opts, work, source, kind)
    squash = media / opts.live_dir / opts.squashfs_name
    if squash.is_file():
        return _in_squashfs(rec, opts, work, os.fspath(squash))
    for name in ROOTFS_NAMES:
        if (media / opts.live_dir / name).is_file():
            return media / opts.live_dir / name
    raise ImageError(f"{opts.image}: no {opts.live_dir}/{opts.squashfs_name} nor "
                     f"{opts.live_dir}/rootfs.img on it",
                     hint="check --live-dir and --squashfs-name (rd.live.dir, rd.live.squashimg)")


def _head(source: str, size: int = 65536) -> bytes:
    with open(source, "rb") as f:
        return f.read(size)


def _kind_of(source: str) -> Kind | str:
    head = _head(source)
    if head[32769:32774] == b"CD001":
        return "iso9660"
    return detect(head)


def _holds(source: str, opts: SetupOptions) -> bool:
    """Does an ext filesystem (not mounted) hold the live directory?"""
    result = run(["debugfs", "-R", f"stat /{opts.live_dir}", source], check=False)
    return result.returncode == 0 and "Inode:" in result.stdout


def _media(rec: Recorder, opts: SetupOptions, work: Path, source: str,
           kind: Kind | str) -> Path:
    """Mount the boot medium (a filesystem, or the partition of a disk that
    holds the live directory) read-only."""
    candidates = _partitions(source) if kind in (Kind.GPT, Kind.MBR) else [(0, 0)]
    for offset, size in candidates:
        dev = source
        if offset or size or not _is_block(source):
            dev = rec.loop(source, read_only=True, offset=offset, size=size)
        fstype = _fs_type(dev)
        if fstype not in ("ext2", "ext3", "ext4", "iso9660", "vfat", "squashfs"):
            continue
        where = rec.mkdir(work / f"media{len(rec.state.steps)}")
        rec.mount(dev, where, fstype=fstype, options="ro")
        if (where / opts.live_dir).is_dir():
            return where
    raise ImageError(f"{opts.image}: no filesystem on it holds {opts.live_dir}/",
                     hint="check --live-dir (rd.live.dir)")


def _partitions(source: str) -> list[tuple[int, int]]:
    table = json.loads(run(["sfdisk", "--json", source]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    return [(int(p["start"]) * sector, int(p["size"]) * sector)
            for p in table.get("partitions", [])]


def _is_block(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def _fs_type(dev: str) -> str:
    return run(["blkid", "-c", "/dev/null", "-o", "value", "-s", "TYPE", dev],
               check=False).stdout.strip()


def _in_squashfs(rec: Recorder, opts: SetupOptions, work: Path, squash: str) -> Path:
    try:
        parse_squashfs(_head(squash, 96), size=os.path.getsize(squash)
                       if not _is_block(squash) else None)
    except DmoverlayError as exc:
        raise ImageError(f"{squash}: {exc.message}", hint="the image is damaged") from None
    dev = rec.loop(squash, read_only=True)
    where = rec.mkdir(work / "squashfs")
    rec.mount(dev, where, fstype="squashfs", options="ro")
    for name in ROOTFS_NAMES:
        if (where / opts.live_dir / name).is_file():
            return where / opts.live_dir / name
    raise ImageError(f"{squash}: no {opts.live_dir}/rootfs.img inside",
                     hint="build it with dmoverlay build, or check --live-dir")


def _check_ext(dev: str, rootfs: Path) -> None:
    head = _head(dev, 2048)
    try:
        parse_ext4(head[1024:2048], size=_sectors(dev) * SECTOR)
    except DmoverlayError as exc:
        raise ImageError(f"{rootfs}: {exc.message}", hint="the image is damaged") from None


def _sectors(dev: str) -> int:
    name = os.path.basename(os.path.realpath(dev))
    return int(Path(f"/sys/class/block/{name}/size").read_text())


def _cow_file(rec: Recorder, opts: SetupOptions, work: Path, size: int) -> Path:
    file_size = cow_file_size(size)
    if opts.tmpfs_dir is None:
        place = rec.mkdir(work / "cow")
        # a tmpfs of exactly the overlay's size (plus the kernel's slack):
        # the COW can never take more RAM than it was given
        rec.mount("tmpfs", place, fstype="tmpfs", options=f"size={file_size + MiB},mode=0700")
    else:
        place = opts.tmpfs_dir
        st = os.statvfs(place)
        if st.f_bavail * st.f_frsize < file_size:
            raise OverlayError(f"{place} has {format_size(st.f_bavail * st.f_frsize)} free, "
                               f"too little for a {format_size(size)} COW",
                               hint="give a smaller --overlay-size or a larger tmpfs")
    cow_file = place / f"{opts.name}.cow"
    with open(cow_file, "xb") as f:  # never someone else's file
        f.truncate(file_size)  # sparse: RAM is taken only as the overlay fills
    rec.state.cow_file = os.fspath(cow_file)
    rec.add(Step("file", os.fspath(cow_file)))
    return cow_file


def _dm_exists(name: str) -> bool:
    return find_tool("dmsetup") is not None and \
        run(["dmsetup", "info", name], check=False).returncode == 0


# ------------------------------------------------------------------ teardown


def load_state(state_dir: Path, name: str) -> tuple[State, Path]:
    path = state_path(state_dir, name)
    try:
        return State.from_json(path.read_text()), path
    except FileNotFoundError:
        raise OverlayError(f"no overlay named {name!r} is set up",
                           hint=f"nothing recorded in {path}") from None
    except (ValueError, TypeError) as exc:
        raise OverlayError(f"{path}: unreadable state ({exc})") from None


def teardown(state_dir: Path, name: str) -> State | None:
    """Undo an overlay; None when there was none (teardown is idempotent)."""
    require_root()
    try:
        state, path = load_state(state_dir, name)
    except OverlayError:
        return None
    _unwind(state, path)
    return state


def _unwind(state: State, path: Path) -> None:
    """Undo the recorded steps, newest first; what is busy is said, and kept
    recorded so that a later teardown can finish."""
    while state.steps:
        step = state.steps[-1]
        _undo(step)
        state.steps.pop()
        state.save(path)
    path.unlink(missing_ok=True)


def _undo(step: Step) -> None:
    if step.kind == "mount":
        if os.path.ismount(step.what):
            _retry(lambda: blockdev.unmount(step.what), what=step.what)
    elif step.kind == "dm":
        if _dm_exists(step.what):
            _retry(lambda: run(["dmsetup", "remove", step.what]), what=f"/dev/mapper/{step.what}")
    elif step.kind == "loop":
        for dev in [step.what] if step.what else loops_backed_by(step.backing):
            blockdev.loop_teardown(dev, backing=step.backing)
    elif step.kind == "file":
        Path(step.what).unlink(missing_ok=True)
    elif step.kind == "dir" and not os.path.ismount(step.what):
        shutil.rmtree(step.what, ignore_errors=True)


def loops_backed_by(backing: str, *, sysfs: Path = Path("/sys")) -> list[str]:
    """Loop devices attached to a file (a setup killed before it noted which)."""
    found = []
    for path in sorted(sysfs.glob("block/loop*/loop/backing_file")):
        with suppress(OSError):
            if path.read_text().strip() == backing:
                found.append(f"/dev/{path.parent.parent.name}")
    return found


def _retry(action: Callable[[], object], *, what: str) -> None:
    for attempt in range(5):
        try:
            action()
            return
        except DmoverlayError as exc:
            if attempt == 4:
                users = busy_users(what)
                raise OverlayError(f"{what} is busy" + (f": used by {users}" if users else ""),
                                   hint=f"stop them and run teardown again ({exc.message})") \
                    from None
            time.sleep(0.2 * (attempt + 1))


def busy_users(path: str) -> str:
    """Processes whose cwd, root or open files are at or below `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for link in _proc_links(pid):
            if link == path or link.startswith(path.rstrip("/") + "/"):
                comm = Path(f"/proc/{pid}/comm").read_text().strip() if \
                    Path(f"/proc/{pid}/comm").exists() else "?"
                found.append(f"{comm} ({pid})")
                break
    return ", ".join(found[:10])


def _proc_links(pid: str) -> list[str]:
    names = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
    with suppress(OSError):  # the process is gone, or not ours to read
        names += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    links = []
    for name in names:
        try:
            links.append(os.readlink(name))
        except OSError:
            continue
    return links


# ------------------------------------------------------------------ status


@dataclass(frozen=True)
class Status:
    name: str
    target: str
    state: str
    used: int
    total: int
    ram_free: int | None  # room left in the tmpfs holding the COW file

    @property
    def free(self) -> int:
        free = max(0, self.total - self.used) if self.state == "active" else 0
        return min(free, self.ram_free) if self.ram_free is not None else free

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 100.0

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "target": self.target, "state": self.state,
                "used": self.used, "total": self.total, "free": self.free,
                "percent": round(self.percent, 2), "ram_free": self.ram_free}


def status(state_dir: Path, name: str) -> Status:
    state, _ = load_state(state_dir, name)
    names = Names(name)
    line = run(["dmsetup", "status", names.rw]).stdout
    snap = cow.parse_status(line)
    ram_free = None
    if state.cow_file:
        st = os.statvfs(os.path.dirname(state.cow_file))
        ram_free = st.f_bavail * st.f_frsize
    return Status(name, state.target, snap.state.value, snap.used_bytes, snap.total_bytes,
                  ram_free)
