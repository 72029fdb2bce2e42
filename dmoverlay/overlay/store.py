"""Opening the persistent overlay's store for setup: found on its device
(mounted if need be), checked, made or reset, and attached.  What a store
may be is decided in `persistent`; this module acts on it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.errors import ImageError, OverlayError, UsageError
from dmoverlay.overlay import baseid, devspec, persistent
from dmoverlay.overlay.baseid import BaseIdentity
from dmoverlay.overlay.dmtable import SECTOR, Mode
from dmoverlay.overlay.kernel import device_sectors, is_block, loops_backed_by, mounted_at
from dmoverlay.overlay.media import fs_type, label_uuid, read_head
from dmoverlay.overlay.options import SetupOptions
from dmoverlay.overlay.persistent import OverlaySpec
from dmoverlay.overlay.recorder import Recorder
from dmoverlay.overlay.state import StepKind


def persistent_store(rec: Recorder, opts: SetupOptions, spec: OverlaySpec, work: Path,
                     medium: str, base: BaseIdentity) -> str:
    """The device the persistent store `spec` is on: the overlay file on a
    loop, or a raw partition itself; refused when it belongs to another
    base than `base`."""
    read_only = opts.overlay_readonly
    if spec.where is None:
        assert spec.path is not None
        return _store_device(rec, opts, os.path.abspath(spec.path), base, raw=False)
    device, dev = spec.where.text, _overlay_device(rec, spec.where, read_only=read_only)
    fstype = fs_type(dev)
    if spec.path is None and fstype in ("", "DM_snapshot_cow"):
        return _store_device(rec, opts, dev, base, raw=True)
    if not fstype:
        raise ImageError(f"{device}: holds no filesystem to keep {spec.path} in",
                         hint=f"give --overlay {device} alone to use the device itself")
    where = _our_mount(rec, dev)  # the live medium itself
    if where is None:
        _check_not_mounted(dev, device)
        where = rec.mkdir(work / "overlay-fs")
        rec.mount(dev, where, fstype=fstype, options="ro" if read_only else "rw")
    if not read_only and os.statvfs(where).f_flag & os.ST_RDONLY:
        raise OverlayError(f"{device} was mounted read-only",
                           hint="a persistent overlay is written; or give --overlay-readonly")
    inner = spec.path or persistent.auto_path(opts.live_dir, *label_uuid(medium))
    return _store_device(rec, opts, os.fspath(where / inner.lstrip("/")), base, raw=False,
                         shown=f"{device}:{inner}")


def _overlay_device(rec: Recorder, where: devspec.Location, *, read_only: bool) -> str:
    """The block device named by a spec or path; a filesystem image on a loop."""
    text, dev = where.text, devspec.find(where)
    if not os.path.exists(dev):
        raise UsageError(f"--overlay {text}: no such file or device")
    if not is_block(dev):
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
    where = mounted_at(os.stat(dev).st_rdev) if is_block(dev) else ""
    ours = {step.what for step in rec.state.steps if step.kind is StepKind.MOUNT}
    return Path(where) if where in ours else None


def _check_not_mounted(dev: str, text: str) -> None:
    where = mounted_at(os.stat(dev).st_rdev) if is_block(dev) else ""
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


def _store_device(rec: Recorder, opts: SetupOptions, path: str, base: BaseIdentity, *,
                  raw: bool, shown: str = "") -> str:
    """Check (make, reset) the store and attach it."""
    shown = shown or path
    read_only = opts.overlay_readonly
    size = _store_size(rec, opts, path, raw=raw, shown=shown)
    _check_unused(path, raw=raw, shown=shown)
    if opts.overlay_reset:
        _reset(path, shown)
    head = read_head(path)
    header = persistent.read_header(head, where=shown, probed=fs_type(path))
    if read_only and header.state is persistent.Store.NEW:
        raise UsageError(f"{shown}: an empty overlay: nothing to show read-only",
                         hint="set it up once without --overlay-readonly")
    check_base(path, head, header, base, shown=shown, read_only=read_only)
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
    size = device_sectors(path) * SECTOR if raw else os.path.getsize(path)
    persistent.check_size(size, wanted=wanted, where=shown)
    return size


def check_base(path: str, head: bytes, header: persistent.StoreHeader, base: BaseIdentity, *,
                shown: str, read_only: bool) -> None:
    """Refuse a store made over another base; in a new store, and in one
    that has no record yet (dracut's), record `base`."""
    if header.state is persistent.Store.NEW:
        # the header written here, not by the kernel: its header write
        # would wipe the record beside it
        write_at(path, 0, baseid.new_store(base), shown)
        return
    if not baseid.has_room(header.chunk_sectors):
        log.warning(f"{shown}: its chunks of {header.chunk_sectors} sector leave no room to "
                    "record the base it belongs to: it is used unchecked")
        return
    if baseid.decode_merging(head[:header.chunk_sectors * SECTOR], where=shown) is not None:
        raise OverlayError(f"{shown}: a merge of this overlay into its base was cut short: "
                           "the two are half merged", hint="finish it: dmoverlay merge BASE "
                                                           "STORE")
    verdict = baseid.judge(baseid.decode(head, where=shown), base, where=shown)
    if verdict is baseid.Verdict.SAME:
        return
    if read_only:
        log.warning(f"{shown}: no record of the base it belongs to (made by dracut?): "
                    f"taken as {base.describe()}, not recorded (read-only)")
        return
    log.warning(f"{shown}: no record of the base it belongs to (made by dracut?): "
                f"taken as {base.describe()}, and recorded")
    write_at(path, baseid.RECORD_OFFSET, baseid.encode(base), shown)


def write_at(path: str, offset: int, data: bytes, shown: str) -> None:
    """Write into the store before the kernel sees it: synced, so that
    what the kernel reads (past the page cache of a raw device) holds it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError(errno.EIO, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OverlayError(f"cannot write the record of its base into {shown}: "
                           f"{exc.strerror}") from None


def _reset(path: str, shown: str) -> None:
    try:
        with open(path, "r+b") as f:
            f.write(bytes(persistent.RESET_BYTES))
            os.fsync(f.fileno())
    except OSError as exc:
        raise OverlayError(f"cannot reset {shown}: {exc.strerror}") from None
