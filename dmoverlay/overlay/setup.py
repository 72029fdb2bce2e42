"""`dmoverlay setup / status / teardown`: the boot-time overlay, as dracut's
dmsquash-live makes it, on real loop devices and device-mapper.

Every attach is recorded in a state file under /run before the next one,
so teardown undoes exactly what exists, after a clean setup or a crash."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import cow, log
from dmoverlay.core.cow import parse_pool_status
from dmoverlay.core.errors import DmoverlayError, ImageError, UsageError
from dmoverlay.core.run import find_tool, run
from dmoverlay.core.sizes import MiB, format_size
from dmoverlay.core.superblock import Kind, detect, parse_ext4, parse_squashfs
from dmoverlay.overlay import blockdev, devspec, persistent
from dmoverlay.overlay.dmtable import (
    SECTOR,
    Device,
    Mode,
    Names,
    State,
    Step,
    ThinPool,
    cow_file_size,
    layout,
    thin_sizes,
)

STATE_DIR = Path("/run/dmoverlay")
ROOTFS_NAMES = ("rootfs.img", "ext3fs.img")  # dracut's order


class OverlayError(DmoverlayError):
    """Setup, status or teardown could not be done."""


class NoOverlay(OverlayError):
    """Nothing is recorded under that name."""


@dataclass(frozen=True)
class SetupOptions:
    image: str
    target: Path
    name: str = "live"
    overlay_size: int | None = None  # RAM layer (None: half the RAM); or a new overlay file
    live_dir: str = "LiveOS"
    squashfs_name: str = "squashfs.img"
    tmpfs_dir: Path | None = None  # an existing tmpfs for the COW file; else our own
    state_dir: Path = STATE_DIR
    overlay: str | None = None  # persistent overlay: DEVICE:PATH, DEVICE or FILE
    overlay_reset: bool = False  # start the persistent overlay afresh
    overlay_readonly: bool = False  # show it, keep new writes in RAM
    overlay_thin: bool = False  # RAM layer as a thin volume: fstrim gives RAM back

    @property
    def mode(self) -> Mode:
        if self.overlay is None:
            return Mode.RAM
        return Mode.READONLY if self.overlay_readonly else Mode.PERSISTENT


def check_options(opts: SetupOptions) -> None:
    """Combinations that mean nothing, refused before anything is touched."""
    if opts.overlay is None:
        for flag, given in (("--overlay-reset", opts.overlay_reset),
                            ("--overlay-readonly", opts.overlay_readonly)):
            if given:
                raise UsageError(f"{flag} needs --overlay",
                                 hint="name the persistent overlay: --overlay DEVICE:PATH")
        return
    persistent.parse_spec(opts.overlay)
    if opts.overlay_reset and opts.overlay_readonly:
        raise UsageError("--overlay-reset and --overlay-readonly contradict each other",
                         hint="a read-only overlay is never written")
    if opts.overlay_thin and not opts.overlay_readonly:
        raise UsageError("--overlay-thin with --overlay needs --overlay-readonly",
                         hint="writes go to a persistent overlay itself; only a read-only "
                              "one has a RAM layer to make thin")
    if opts.tmpfs_dir is not None and opts.mode is Mode.PERSISTENT:
        raise UsageError("--tmpfs-dir means nothing with a persistent overlay",
                         hint="its COW is the overlay file, not RAM")


# ------------------------------------------------------------------ checks


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
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise OverlayError(f"{path} exists already", hint="a setup under this name "
                               "died before it noted it, or something planted it: look at "
                               "it, remove it, try again") from None
        self.add(Step("dir", os.fspath(path)))
        return path

    def loop(self, file: str, *, read_only: bool, offset: int = 0, size: int = 0) -> str:
        # the device is known only once attached: until then its backing file
        # is what teardown looks for
        require_loop()
        step = self.add(Step("loop", "", backing=os.path.realpath(file)))
        step.what = blockdev.loop_setup(file, read_only=read_only, offset=offset, size=size)
        self.state.save(self.path)
        return step.what

    def mount(self, device: str, where: Path, *, fstype: str, options: str) -> Path:
        require_filesystem(fstype)
        self.add(Step("mount", os.fspath(where)))
        blockdev.mount(device, where, fstype=fstype, options=options)
        return where

    def dm(self, device: Device) -> str:
        self.add(Step("dm", device.name))
        argv = ["dmsetup", "create", device.name, "--table", device.table]
        run([*argv, "--readonly"] if device.read_only else argv)
        node = Path("/dev/mapper") / device.name
        for _ in range(100):  # udev, where it runs, makes the node a moment later
            if node.exists():
                break
            time.sleep(0.05)
        else:
            raise OverlayError(f"{node} did not appear")
        for message in device.messages:
            run(["dmsetup", "message", device.name, "0", message])
        return os.fspath(node)

    def new_file(self, path: Path, size: int) -> Path:
        """A persistent overlay made by this setup: removed if the setup fails,
        kept by a teardown after it succeeded."""
        try:
            with open(path, "xb") as f:  # never someone else's file
                self.add(Step("newfile", os.fspath(path)))
                # allocated now: a store that finds its disk full halfway is
                # marked invalid by the kernel, and everything in it is lost
                os.posix_fallocate(f.fileno(), 0, size)
                os.fsync(f.fileno())
        except OSError as exc:
            raise OverlayError(f"cannot make the overlay file {path}: {exc.strerror}",
                               hint="give a smaller --overlay-size, or another place") from None
        return path


# ------------------------------------------------------------------ setup


def state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def setup(opts: SetupOptions) -> State:
    require_root()
    names = Names(opts.name)
    check_options(opts)
    check_target(opts.target)
    require_target()
    if opts.overlay_thin:
        require_target("thin-pool", "dm-thin-pool", "CONFIG_DM_THIN_PROVISIONING")
    size = 0  # a persistent overlay's size is its file's
    if opts.mode is not Mode.PERSISTENT:
        size = overlay_size(opts, ram_bytes(Path("/proc/meminfo").read_text()))
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_state_dir(opts.state_dir)
    path = state_path(opts.state_dir, opts.name)
    if path.exists() or any(_dm_exists(n) for n in names.all()):
        raise UsageError(f"an overlay named {opts.name!r} exists already",
                         hint="tear it down first, or give --name")
    state = State(opts.name, os.fspath(opts.target), opts.image, size,
                  mode=opts.mode.value, thin=opts.overlay_thin)
    rec = Recorder(state, path)
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
        rootfs, medium = _find_rootfs(rec, opts, work)
    with log.step("attaching rootfs.img read-only"):
        base = rec.loop(os.fspath(rootfs), read_only=True)
        _check_ext(base, rootfs)
        sectors = _sectors(base)
    store = ""
    if opts.overlay is not None:
        with log.step(f"opening the persistent overlay {opts.overlay}"):
            store = _persistent_store(rec, opts, work, medium)
    cow_dev, thin = "", None
    if opts.mode is not Mode.PERSISTENT and opts.overlay_thin:
        with log.step(f"making a {format_size(size)} thin pool in RAM"):
            thin = _thin_pool(rec, opts, work, size)
    elif opts.mode is not Mode.PERSISTENT:
        with log.step(f"making a {format_size(size)} COW store in RAM"):
            cow_file = _cow_file(rec, opts, work, size)
            cow_dev = rec.loop(os.fspath(cow_file), read_only=False)
    devices = layout(names, sectors=sectors, base=base, mode=opts.mode, cow=cow_dev,
                     persistent=store, thin=thin)
    rw = ""
    with log.step(f"creating {', '.join(d.name for d in devices)}"):
        for device in devices:
            node = rec.dm(device)
            rw = node if device.name == names.rw else rw
    with log.step(f"mounting {names.rw} on {opts.target}"):
        rec.mount(rw, opts.target, fstype="ext4", options="")


def _find_rootfs(rec: Recorder, opts: SetupOptions, work: Path) -> tuple[Path, str]:
    """Follow the image down to LiveOS/rootfs.img, mounting what is on the way;
    also the live medium (dracut's livedev, which names the auto overlay)."""
    spec = devspec.parse(opts.image)
    source = devspec.resolve(spec) if spec else opts.image
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file or device")
    kind = _kind_of(source)
    if kind is Kind.EXT and not _holds(source, opts):
        return Path(source), source  # a rootfs.img itself
    if kind is Kind.SQUASHFS:
        return _in_squashfs(rec, opts, work, source), source
    media, medium = _media(rec, opts, work, source, kind)
    squash = media / opts.live_dir / opts.squashfs_name
    if squash.is_file():
        return _in_squashfs(rec, opts, work, os.fspath(squash)), medium
    for name in ROOTFS_NAMES:
        if (media / opts.live_dir / name).is_file():
            return media / opts.live_dir / name, medium
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
           kind: Kind | str) -> tuple[Path, str]:
    """Mount the boot medium (a filesystem, or the partition of a disk that
    holds the live directory) read-only; read-write when it holds the
    persistent overlay too, as a live stick made by livecd-iso-to-disk does."""
    candidates = _partitions(source) if kind in (Kind.GPT, Kind.MBR) else [(0, 0)]
    for offset, size in candidates:
        dev = source
        if offset or size or not _is_block(source):
            dev = rec.loop(source, read_only=True, offset=offset, size=size)
        fstype = _fs_type(dev)
        if fstype not in ("ext2", "ext3", "ext4", "iso9660", "vfat", "squashfs"):
            continue
        where = rec.mkdir(work / f"media{len(rec.state.steps)}")
        rec.mount(dev, where, fstype=fstype, options="rw" if _holds_overlay(opts, dev) else "ro")
        if (where / opts.live_dir).is_dir():
            return where, dev
    raise ImageError(f"{opts.image}: no filesystem on it holds {opts.live_dir}/",
                     hint="check --live-dir (rd.live.dir)")


def _holds_overlay(opts: SetupOptions, dev: str) -> bool:
    """Is this block device the one a read-write persistent overlay is on?"""
    if opts.mode is not Mode.PERSISTENT or not _is_block(dev):
        return False
    assert opts.overlay is not None
    device = persistent.parse_spec(opts.overlay).device
    if device is None:
        return False
    spec = devspec.parse(device)
    with suppress(DmoverlayError, OSError):
        named = devspec.resolve(spec) if spec else device
        return _is_block(named) and os.stat(named).st_rdev == os.stat(dev).st_rdev
    return False


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


def _ram_place(rec: Recorder, opts: SetupOptions, work: Path, need: int, size: int) -> Path:
    if opts.tmpfs_dir is None:
        place = rec.mkdir(work / "cow")
        # a tmpfs of exactly the overlay's size (plus the kernel's slack):
        # the COW can never take more RAM than it was given
        rec.mount("tmpfs", place, fstype="tmpfs", options=f"size={need + MiB},mode=0700")
        return place
    st = os.statvfs(opts.tmpfs_dir)
    if st.f_bavail * st.f_frsize < need:
        raise OverlayError(f"{opts.tmpfs_dir} has {format_size(st.f_bavail * st.f_frsize)} free, "
                           f"too little for a {format_size(size)} COW",
                           hint="give a smaller --overlay-size or a larger tmpfs")
    return opts.tmpfs_dir


def _sparse_file(rec: Recorder, path: Path, size: int) -> Path:
    with open(path, "xb") as f:  # never someone else's file
        f.truncate(size)  # sparse: RAM is taken only as the overlay fills
    rec.add(Step("file", os.fspath(path)))
    return path


def _cow_file(rec: Recorder, opts: SetupOptions, work: Path, size: int) -> Path:
    file_size = cow_file_size(size)
    place = _ram_place(rec, opts, work, file_size, size)
    rec.state.cow_file = os.fspath(place / f"{opts.name}.cow")
    return _sparse_file(rec, place / f"{opts.name}.cow", file_size)


def _thin_pool(rec: Recorder, opts: SetupOptions, work: Path, size: int) -> ThinPool:
    meta_size, data_size = thin_sizes(size)
    place = _ram_place(rec, opts, work, meta_size + data_size, size)
    meta = _sparse_file(rec, place / f"{opts.name}.thin-meta", meta_size)
    data = _sparse_file(rec, place / f"{opts.name}.thin-data", data_size)
    rec.state.cow_file = os.fspath(data)
    # a loop device on a tmpfs file passes discards down as holes punched
    # in it: that is what gives the RAM back
    return ThinPool(rec.loop(os.fspath(meta), read_only=False),
                    rec.loop(os.fspath(data), read_only=False), data_size // SECTOR)


# ------------------------------------------------------------------ persistent overlay


def _persistent_store(rec: Recorder, opts: SetupOptions, work: Path, medium: str) -> str:
    """The device the persistent store is on: the overlay file on a loop, or a
    raw partition itself."""
    assert opts.overlay is not None
    spec = persistent.parse_spec(opts.overlay)
    read_only = opts.overlay_readonly
    if spec.device is None:
        assert spec.path is not None
        return _store_device(rec, opts, os.path.abspath(spec.path), raw=False)
    dev = _overlay_device(rec, spec.device, read_only=read_only)
    fstype = _fs_type(dev)
    if spec.path is None and fstype in ("", "DM_snapshot_cow"):
        return _store_device(rec, opts, dev, raw=True)
    if not fstype:
        raise ImageError(f"{spec.device}: holds no filesystem to keep {spec.path} in",
                         hint=f"give --overlay {spec.device} alone to use the device itself")
    where = _our_mount(rec, dev)  # the live medium itself
    if where is None:
        _check_not_mounted(dev, spec.device)
        where = rec.mkdir(work / "overlay-fs")
        rec.mount(dev, where, fstype=fstype, options="ro" if read_only else "rw")
    if not read_only and os.statvfs(where).f_flag & os.ST_RDONLY:
        raise OverlayError(f"{spec.device} was mounted read-only",
                           hint="a persistent overlay is written; or give --overlay-readonly")
    inner = spec.path or persistent.auto_path(opts.live_dir, *_label_uuid(medium))
    return _store_device(rec, opts, os.fspath(where / inner.lstrip("/")), raw=False,
                         shown=f"{spec.device}:{inner}")


def _overlay_device(rec: Recorder, text: str, *, read_only: bool) -> str:
    """The block device named by a spec or path; a filesystem image on a loop."""
    spec = devspec.parse(text)
    dev = devspec.resolve(spec) if spec else text
    if not os.path.exists(dev):
        raise UsageError(f"--overlay {text}: no such file or device")
    if not _is_block(dev):
        if not os.path.isfile(dev):
            raise UsageError(f"--overlay {text}: neither a block device nor an image file")
        _check_writable(dev, read_only=read_only, what=text)
        return rec.loop(dev, read_only=read_only)
    name = os.path.basename(os.path.realpath(dev))
    if not read_only and Path(f"/sys/class/block/{name}/ro").read_text().strip() == "1":
        raise OverlayError(f"--overlay {text}: {dev} is read-only",
                           hint="a persistent overlay is written; or give --overlay-readonly")
    return dev


def _our_mount(rec: Recorder, dev: str) -> Path | None:
    """Where this setup mounted `dev` already, if it did."""
    where = _mounted_at(os.stat(dev).st_rdev) if _is_block(dev) else ""
    ours = {step.what for step in rec.state.steps if step.kind == "mount"}
    return Path(where) if where in ours else None


def _check_not_mounted(dev: str, text: str) -> None:
    where = _mounted_at(os.stat(dev).st_rdev) if _is_block(dev) else ""
    if where:
        raise OverlayError(f"--overlay {text}: {dev} is mounted at {where} already",
                           hint=f"give the overlay file's path under {where} instead")


def _check_writable(path: str, *, read_only: bool, what: str) -> None:
    if not read_only and not os.access(path, os.W_OK):
        raise OverlayError(f"--overlay {what}: {path} is not writable",
                           hint="a persistent overlay is written; or give --overlay-readonly")


def _check_unused(path: str, *, raw: bool, shown: str) -> None:
    """Two snapshots on one store would each overwrite the other's chunks."""
    if raw:
        name = os.path.basename(os.path.realpath(path))
        users = os.listdir(f"/sys/class/block/{name}/holders")
    else:
        users = loops_backed_by(os.path.realpath(path))
    if users:
        raise OverlayError(f"{shown} is in use already (by {', '.join(users)})",
                           hint="tear down the overlay that uses it first")


def _mounted_at(rdev: int) -> str:
    devno = f"{os.major(rdev)}:{os.minor(rdev)}"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[2] == devno:
            return fields[4]
    return ""


def _label_uuid(dev: str) -> tuple[str, str]:
    def tag(name: str) -> str:
        return run(["blkid", "-c", "/dev/null", "-o", "value", "-s", name, dev],
                   check=False).stdout.strip()
    return tag("LABEL"), tag("UUID")


def _store_device(rec: Recorder, opts: SetupOptions, path: str, *, raw: bool,
                  shown: str = "") -> str:
    """Check (make, reset) the store and attach it."""
    shown = shown or path
    read_only = opts.overlay_readonly
    size = _store_size(rec, opts, path, raw=raw, shown=shown)
    _check_unused(path, raw=raw, shown=shown)
    if opts.overlay_reset:
        _reset(path, shown)
    header = persistent.read_header(_head(path), where=shown, probed=_fs_type(path))
    if read_only and header.state is persistent.Store.NEW:
        raise UsageError(f"{shown}: an empty overlay: nothing to show read-only",
                         hint="set it up once without --overlay-readonly")
    rec.state.overlay = shown
    if opts.mode is Mode.PERSISTENT:
        rec.state.overlay_size = size
    return path if raw else rec.loop(path, read_only=read_only)


def _store_size(rec: Recorder, opts: SetupOptions, path: str, *, raw: bool, shown: str) -> int:
    """The size of the store, made now if it is missing and may be."""
    wanted = opts.overlay_size if opts.mode is Mode.PERSISTENT else None
    if not os.path.exists(path):
        if opts.overlay_readonly:
            raise UsageError(f"{shown}: no such overlay file",
                             hint="--overlay-readonly shows an existing overlay")
        if not os.path.isdir(os.path.dirname(path)):
            raise UsageError(f"{shown}: its directory does not exist",
                             hint="create it first, or check the path")
        size = persistent.new_size(wanted, where=shown)
        rec.new_file(Path(path), size)
        return size
    if not raw and not os.path.isfile(path):
        raise UsageError(f"{shown}: not a regular file")
    _check_writable(path, read_only=opts.overlay_readonly, what=shown)
    size = _sectors(path) * SECTOR if raw else os.path.getsize(path)
    persistent.check_size(size, wanted=wanted, where=shown)
    return size


def _reset(path: str, shown: str) -> None:
    try:
        with open(path, "r+b") as f:
            f.write(bytes(persistent.RESET_BYTES))
            os.fsync(f.fileno())
    except OSError as exc:
        raise OverlayError(f"cannot reset {shown}: {exc.strerror}") from None


def _dm_exists(name: str, sysfs: Path = Path("/sys")) -> bool:
    """A device-mapper device of that name, by sysfs (no dmsetup to start)."""
    for entry in sysfs.glob("block/dm-*/dm/name"):
        with suppress(OSError):
            if entry.read_text().strip() == name:
                return True
    return False


# ------------------------------------------------------------------ teardown


STATE_MAX = 1 << 20  # bytes: a state file holds a few dozen steps
_LOOP = re.compile(r"/dev/loop[0-9]+")


def load_state(state_dir: Path, name: str) -> tuple[State, Path]:
    """The state setup recorded, checked before anything acts on it: /run
    is writable by more than setup (an update's run/ entries land there), so
    a state file is input like any other."""
    Names(name)  # a name that cannot leave the state directory
    check_state_dir(state_dir)
    path = state_path(state_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoOverlay(f"no overlay named {name!r} is set up",
                           hint=f"nothing recorded in {path}") from None
    except OSError as exc:
        raise OverlayError(f"{path}: cannot read the state ({exc.strerror})",
                           hint="it is not a file setup wrote; look at it, remove it") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OverlayError(f"{path}: not a state file setup wrote (not a regular file "
                               "of this user)", hint="look at it, and remove it")
        text = f.read(STATE_MAX + 1)
    try:
        if len(text) > STATE_MAX:
            raise ValueError(f"over {STATE_MAX} bytes")
        state = State.from_json(text.decode())
        check_state(state, state_dir, name)
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise OverlayError(f"{path}: unreadable state ({exc})",
                           hint="nothing was torn down: look at it, and undo by hand") from None
    return state, path


def check_state_dir(state_dir: Path) -> None:
    """The state directory is setup's own: a real directory (not a link to
    elsewhere), of this user, that nobody else may write in."""
    try:
        st = os.lstat(state_dir)
    except FileNotFoundError:
        return  # nothing recorded, or setup makes it
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OverlayError(f"{state_dir}: not a private directory of this user (a link, "
                           "another owner's, or writable by others)",
                           hint="something planted it: look at it, remove it, try again")


def check_state(state: State, state_dir: Path, name: str) -> None:
    """ValueError unless every step is one setup could have recorded: teardown
    unmounts, detaches, removes and deletes only what names its own things."""
    if state.name != name or not isinstance(state.complete, bool):
        raise ValueError(f"it names the overlay {state.name!r}")
    work = os.fspath(state_dir / name)  # as setup makes it
    dirs = {work}  # mount points are directories setup made (or the target)
    names = Names(name).all()
    files = (f"{name}.cow", f"{name}.thin-meta", f"{name}.thin-data")
    allowed: dict[str, Callable[[Step], bool]] = {
        "dir": lambda s: s.what == work or (os.path.dirname(s.what) == work
                                            and os.path.basename(s.what) not in ("", ".", "..")),
        "mount": lambda s: s.what in dirs or s.what == state.target,
        "dm": lambda s: s.what in names,
        "loop": lambda s: (not s.what or bool(_LOOP.fullmatch(s.what)))
        and os.path.isabs(s.backing),
        "file": lambda s: os.path.isabs(s.what) and os.path.normpath(s.what) == s.what
        and os.path.basename(s.what) in files,
        # removed only while setup is unfinished, and only if it holds a store
        "newfile": lambda s: os.path.isabs(s.what),
    }
    for step in state.steps:
        if not isinstance(step.what, str) or not isinstance(step.backing, str) \
                or not isinstance(step.kind, str):
            raise ValueError(f"a step of unknown form: {step!r}")
        ok = allowed.get(step.kind)
        if ok is None or not ok(step):
            raise ValueError(f"a {step.kind} step setup would not record: {step.what!r}")
        if step.kind == "dir":
            dirs.add(step.what)


def teardown(state_dir: Path, name: str) -> State | None:
    """Undo an overlay; None when there was none (teardown is idempotent)."""
    require_root()
    try:
        state, path = load_state(state_dir, name)
    except NoOverlay:
        return None
    _unwind(state, path)
    return state


def _unwind(state: State, path: Path) -> None:
    """Undo the recorded steps, newest first; what is busy is said, and kept
    recorded so that a later teardown can finish."""
    while state.steps:
        step = state.steps[-1]
        _undo(step, complete=state.complete)
        state.steps.pop()
        state.save(path)
    path.unlink(missing_ok=True)


def _undo(step: Step, *, complete: bool) -> None:
    if step.kind == "mount":
        if os.path.ismount(step.what):
            _retry(lambda: blockdev.unmount(step.what), what=step.what)
    elif step.kind == "dm":
        if _dm_exists(step.what):
            _retry(lambda: run(["dmsetup", "remove", step.what]), what=f"/dev/mapper/{step.what}")
    elif step.kind == "loop":
        for dev in [step.what] if step.what else loops_backed_by(step.backing):
            blockdev.loop_teardown(dev, backing=step.backing)
    elif step.kind == "file" or (step.kind == "newfile" and not complete):
        _remove_ours(step.what, store=step.kind == "newfile")
    elif step.kind == "dir" and not os.path.ismount(step.what):
        # a mount point or the directory holding them: empty once unmounted;
        # anything else in it is not ours to delete
        with suppress(FileNotFoundError, NotADirectoryError):
            try:
                os.rmdir(step.what)
            except OSError as exc:
                log.info(f"warning: {step.what} kept: {exc.strerror}")


def _remove_ours(path: str, *, store: bool) -> None:
    """Delete a file setup made: a regular file (never through a link), and
    for a new overlay file, only while it holds nothing but a store."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.info(f"warning: {path} kept: {exc.strerror}")
        return
    with os.fdopen(fd, "rb") as f:
        mine = stat.S_ISREG(os.fstat(fd).st_mode)
        if mine and store:
            try:
                persistent.read_header(f.read(4096), where=path)
            except DmoverlayError:
                mine = False
    if mine:
        os.unlink(path)
    else:
        log.info(f"warning: {path} kept: not the file setup made")


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
    mode: str = Mode.RAM.value
    overlay: str = ""  # the persistent overlay
    thin: bool = False
    kept_used: int | None = None  # read-only mode: the persistent store shown, its fill
    kept_total: int | None = None

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
                "percent": round(self.percent, 2), "ram_free": self.ram_free,
                "mode": self.mode, "overlay": self.overlay or None, "thin": self.thin,
                "overlay_used": self.kept_used, "overlay_total": self.kept_total}


def status(state_dir: Path, name: str) -> Status:
    """The COW's fill: of the RAM layer when there is one (a read-only
    persistent overlay's too), else of the persistent overlay."""
    state, _ = load_state(state_dir, name)
    names = Names(name)
    ram_free = None
    if state.cow_file:
        st = os.statvfs(os.path.dirname(state.cow_file))
        ram_free = st.f_bavail * st.f_frsize
    if state.thin:
        pool = parse_pool_status(run(["dmsetup", "status", names.pool]).stdout)
        state_word, used, total = pool.state, pool.used, pool.total
    else:
        snap = cow.parse_status(run(["dmsetup", "status", names.rw]).stdout)
        state_word, used, total = snap.state.value, snap.used_bytes, snap.total_bytes
    kept_used = kept_total = None
    if state.mode == Mode.READONLY.value:  # the store shown under the RAM layer
        kept = cow.parse_status(run(["dmsetup", "status", names.ro]).stdout)
        kept_used, kept_total = kept.used_bytes, kept.total_bytes
    return Status(name, state.target, state_word, used, total, ram_free, mode=state.mode,
                  overlay=state.overlay, thin=state.thin, kept_used=kept_used,
                  kept_total=kept_total)
