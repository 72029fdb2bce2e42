"""`dmoverlay setup`: the boot-time overlay, as dracut's dmsquash-live makes
it, on real loop devices and device-mapper.

Every attach is recorded in a state file under /run before the next one
(`recorder`), so teardown undoes exactly what exists, after a clean setup or
a crash.  The root filesystem is found by `media`, a persistent overlay's
store opened by `store`; the RAM layer is made here.  With rd.live.ram the
image is copied into RAM first (`ramcopy`), and the medium let go once
everything stands on the copy."""

from __future__ import annotations

import os
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.errors import DmoverlayError, ImageError, OverlayError, UsageError
from dmoverlay.core.sizes import MiB, format_size
from dmoverlay.core.superblock import parse_ext4
from dmoverlay.overlay.baseid import HEAD_BYTES, identify
from dmoverlay.overlay.dmtable import (
    SECTOR,
    Mode,
    Names,
    ThinPool,
    cow_file_size,
    layout,
    thin_sizes,
)
from dmoverlay.overlay.kernel import device_sectors, dm_exists, require_root, require_target
from dmoverlay.overlay.media import Found, find_image, image_size, read_head, rootfs_in
from dmoverlay.overlay.options import (
    SetupOptions,
    check_options,
    mem_available,
    overlay_size,
    ram_bytes,
    ram_copy_cow,
)
from dmoverlay.overlay.ramcopy import copy_image
from dmoverlay.overlay.recorder import Recorder
from dmoverlay.overlay.state import State, Step, StepKind, check_state_dir, state_path
from dmoverlay.overlay.store import persistent_store
from dmoverlay.overlay.teardown import release, unwind


def setup(opts: SetupOptions) -> State:
    """Make the overlay `opts` asks for; whatever fails, what was made is undone."""
    names = _check(opts)
    size = 0  # a persistent overlay's size is its file's
    if opts.mode is not Mode.PERSISTENT:
        size = overlay_size(opts, ram_bytes(Path("/proc/meminfo").read_text()))
    path = _new_state_path(opts, names)
    state = State(opts.name, os.fspath(opts.target), opts.image.text, size,
                  mode=opts.mode.value, thin=opts.overlay_thin)
    rec = Recorder(state, path)
    try:
        _setup(rec, opts, names, size)
    except BaseException:
        unwind(rec.state, path)
        raise
    rec.state.complete = True
    rec.state.save(path)
    return rec.state


def _check(opts: SetupOptions) -> Names:
    """What can be refused before anything is made."""
    require_root()
    names = Names(opts.name)
    check_options(opts)
    check_target(opts.target)
    require_target()
    if opts.overlay_thin:
        require_target("thin-pool", "dm-thin-pool", "CONFIG_DM_THIN_PROVISIONING")
    return names


def _new_state_path(opts: SetupOptions, names: Names) -> Path:
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_state_dir(opts.state_dir)
    path = state_path(opts.state_dir, opts.name)
    if path.exists() or any(dm_exists(n) for n in names.all()):
        raise UsageError(f"an overlay named {opts.name!r} exists already",
                         hint="tear it down first, or give --name")
    return path


def _setup(rec: Recorder, opts: SetupOptions, names: Names, size: int) -> None:
    work = rec.mkdir(opts.state_dir / opts.name)
    with log.step(f"finding the root filesystem in {opts.image.text}"):
        first = len(rec.state.steps)
        found = find_image(rec, opts, work)
        medium = rec.state.steps[first:]  # what reaching the image took
        image = found.image
        if opts.ram:
            image, size = _copy_to_ram(rec, opts, work, found, size)
        rootfs = rootfs_in(rec, opts, work, image, squashfs=found.squashfs, shown=found.image)
    with log.step("attaching rootfs.img read-only"):
        base = rec.loop(os.fspath(rootfs), read_only=True)
        _check_ext(base, rootfs)
        sectors = device_sectors(base)
    store = ""
    if opts.overlay is not None:
        with log.step(f"opening the persistent overlay {opts.overlay.text}"):
            identity = identify(read_head(base, HEAD_BYTES), sectors, where=os.fspath(rootfs))
            store = persistent_store(rec, opts, opts.overlay, work, found.medium, identity)
    if opts.ram:
        _release_medium(rec, medium)
    cow_dev, thin = _ram_layer(rec, opts, work, size)
    devices = layout(names, sectors=sectors, base=base, mode=opts.mode, cow=cow_dev,
                     persistent=store, thin=thin)
    rw = ""
    with log.step(f"creating {', '.join(d.name for d in devices)}"):
        for device in devices:
            node = rec.dm(device)
            rw = node if device.name == names.rw else rw
    with log.step(f"mounting {names.rw} on {opts.target}"):
        rec.mount(rw, opts.target, fstype="ext4", options="")


def _copy_to_ram(rec: Recorder, opts: SetupOptions, work: Path, found: Found,
                 size: int) -> tuple[str, int]:
    """rd.live.ram: the squashfs.img (or rootfs.img) copied into a tmpfs of
    its own size, once it is known to fit beside the COW; the copy, and the
    COW's size beside it."""
    need = image_size(found.image, squashfs=found.squashfs)
    cow = ram_copy_cow(need, size, mem_available(Path("/proc/meminfo").read_text()),
                       cow_given=opts.overlay_size is not None)
    if cow != size:
        log.info(f"note: a {format_size(cow)} COW in RAM, what the copy leaves of half the RAM")
    with log.step(f"copying {found.image} ({format_size(need)}) to RAM"):
        place = rec.mkdir(work / "ram")
        # its own tmpfs, of the image's size: neither /run's limit nor a
        # tmpfs shared with others decides whether the copy fits
        rec.mount("tmpfs", place, fstype="tmpfs", options=f"size={need + MiB},mode=0700")
        copy = place / ("squashfs.img" if found.squashfs else "rootfs.img")
        copy_image(found.image, copy, need)
    rec.state.ram_copy = need
    if opts.mode is not Mode.PERSISTENT:
        rec.state.overlay_size = cow
    rec.state.save(rec.path)
    return os.fspath(copy), cow


def _release_medium(rec: Recorder, medium: list[Step]) -> None:
    """rd.live.ram: the medium's mounts and loop devices, read no more, let
    go during setup so that the medium can be removed; kept while the
    persistent overlay is on it (dracut's rd.live.ram keeps it too)."""
    if not medium:
        return  # the image was named itself: nothing was mounted to reach it
    others = [s for s in rec.state.steps if not any(s is m for m in medium)]
    if medium_in_use(medium, others):
        log.info("note: the persistent overlay is on the medium: it stays in use")
        return
    rec.state.medium = ""  # first: a state must never name a mount it no longer holds
    with log.step("releasing the medium"):
        release(rec.state, rec.path, medium)


def medium_in_use(medium: list[Step], others: list[Step]) -> bool:
    """Whether another step stands on what the medium's steps mounted: a loop
    device or a new overlay file on a file under one of its mount points."""
    mounts = [os.path.realpath(s.what) for s in medium if s.kind is StepKind.MOUNT]
    used = [os.path.realpath(s.backing if s.kind is StepKind.LOOP else s.what)
            for s in others if s.kind in (StepKind.LOOP, StepKind.NEWFILE)]
    return any(path == top or path.startswith(top.rstrip("/") + "/")
               for path in used for top in mounts)


def _ram_layer(rec: Recorder, opts: SetupOptions, work: Path,
               size: int) -> tuple[str, ThinPool | None]:
    """The RAM layer's COW device, or its thin pool; neither for a persistent overlay."""
    if opts.mode is Mode.PERSISTENT:
        return "", None
    if opts.overlay_thin:
        with log.step(f"making a {format_size(size)} thin pool in RAM"):
            return "", _thin_pool(rec, opts, work, size)
    with log.step(f"making a {format_size(size)} COW store in RAM"):
        cow_file = _cow_file(rec, opts, work, size)
        return rec.loop(os.fspath(cow_file), read_only=False), None


def check_target(target: Path) -> None:
    if not target.is_dir():
        raise UsageError(f"{target}: not a directory", hint="create the mount point first")
    if any(target.iterdir()):
        raise UsageError(f"{target}: not an empty directory", hint="mount the overlay elsewhere")
    if os.path.ismount(target):
        raise UsageError(f"{target}: something is mounted there already")


def _check_ext(dev: str, rootfs: Path) -> None:
    head = read_head(dev, 2048)
    try:
        parse_ext4(head[1024:2048], size=device_sectors(dev) * SECTOR)
    except DmoverlayError as exc:
        raise ImageError(f"{rootfs}: {exc.message}", hint="the image is damaged") from None


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
    rec.add(Step(StepKind.FILE, os.fspath(path)))
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
