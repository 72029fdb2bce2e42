"""`build --from-live NAME`: a running overlay's merged view (its base with
the changes made since) made a new image, as build makes one from a tree.

The view is the one of a single instant, taken without stopping the system
for longer than the changes take to copy:

1. NAME-base is copied to a private file beside the output (sparse).  The
   base never changes, so nothing waits meanwhile.
2. The live root is frozen (fsfreeze: what was written is on the devices,
   every new write waits), and the chunks that differ from the base are
   copied from NAME-rw over that copy.  The exception tables of the
   snapshots between NAME-rw and NAME-base say which (setup keeps every
   store in dm-snapshot's persistent format, the RAM layer's too, in its
   tmpfs file); for any other stack (a thin pool) all of NAME-rw is copied,
   zeros left as holes.  Then it is thawed.  A
   guard process, in a session of its own, thaws it after --freeze-limit
   seconds should this one be killed meanwhile; a copy the guard cut short
   is refused.
3. The copy (ours) is mounted, dmoverlay's journal (.dmoverlay) taken out,
   mounted again read-only, and built from as any tree: the same view gives
   the same image, byte for byte.

Devices are judged as `mkupdates --from-live` judges them (liveview.py),
read with O_DIRECT (the kernel writes the store and the snapshot below the
page cache), and nothing is written on the live root: the output must be on
another filesystem, and not one written through it (a loop over an image
file kept on it), or a write would wait for the thaw.  What sysfs cannot
see (an overlayfs or FUSE mount over the live root) is met by the guard."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from dmoverlay.build import image as builder
from dmoverlay.core import log
from dmoverlay.core.direct import open_direct, pread_direct, read_direct, size_of
from dmoverlay.core.errors import CommandFailed, ImageError, OverlayError, UsageError
from dmoverlay.core.run import find_tool, require_tools, run
from dmoverlay.core.sizes import MiB, format_size
from dmoverlay.core.tree import discard_tree, remove_tree
from dmoverlay.overlay import blockdev, persistent
from dmoverlay.overlay.dmtable import SECTOR, Names
from dmoverlay.overlay.liveview import (
    SYS_DEV_BLOCK,
    check_elsewhere,
    mounted_at,
    overlay_devices,
)

JOURNAL_TOP = ".dmoverlay"  # apply's journal at a root's top: not part of the system
FREEZE_LIMIT = 30.0  # seconds the live root may stay frozen
BLOCK = MiB  # copies go by this much (a multiple of every sector size)


@dataclass(frozen=True)
class Baked:
    result: builder.BuildResult
    frozen: float  # seconds the live root was frozen
    copied: int  # bytes copied while it was


def bake(state_dir: Path, name: str, opts: builder.BuildOptions, *,
         freeze_limit: float = FREEZE_LIMIT) -> Baked:
    """The overlay NAME's merged view built into `opts.output` (its source
    is ignored).  OverlayError or UsageError before anything is frozen when
    the overlay is not one to read, or the output is on its live root."""
    if os.geteuid() != 0:
        raise OverlayError("baking a live overlay needs root",
                           hint="run it as root: it reads the overlay's devices")
    if not 0 < freeze_limit <= 3600:
        raise UsageError(f"--freeze-limit {freeze_limit:g}: give more than 0 and at most "
                         "3600 seconds")
    require_tools("fsfreeze", "mkfs.ext4", "debugfs", "mksquashfs")
    builder.check_outputs(opts)
    found = overlay_devices(state_dir, name)
    state, names, base, base_dev = found.state, found.names, found.base, found.base_dev
    rw, rw_dev = found.rw, found.rw_dev
    live = mounted_at(rw_dev, prefer=state.target)
    out_dir = opts.output.parent
    check_elsewhere(out_dir, rw_dev, names.rw, why="which is frozen while it is copied: "
                    "every write there would wait for the thaw")
    stores = _stores(names, base_dev)
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix=f".{opts.output.name}.bake-", dir=out_dir))
        stack.callback(discard_tree, work)
        copy = work / "rootfs.img"
        try:
            if stores is not None:
                with log.step(f"copying the base ({names.base})"):
                    size = _copy_base(base, copy)
            else:  # all of NAME-rw is copied, frozen: a base copied first would be written over
                size = _empty_copy(rw, copy)
            with log.step(f"freezing {live} and copying what {names.rw} changed"):
                frozen, copied = _copy_changes(live, rw, copy, size, stores, freeze_limit)
        except OSError as exc:  # the root is thawed by now
            hint = "free some space or write it elsewhere" if exc.errno == errno.ENOSPC \
                else None
            raise ImageError(f"copying the live view to {out_dir} failed: {exc.strerror}",
                             hint=hint) from None
        log.info(f"  frozen {frozen:.2f} s; {copied} bytes ({format_size(copied)}) copied "
                 "meanwhile")
        tree = stack.enter_context(_tree(copy, work))
        result = builder.build(replace(opts, source=tree))
        return Baked(result, frozen, copied)


# ------------------------------------------------------------------ the store


@dataclass(frozen=True)
class _Store:
    device: str  # a node of a snapshot's COW device
    chunk_bytes: int


def _stores(names: Names, base_dev: int) -> list[_Store] | None:
    """The stores of the snapshots from NAME-rw down to NAME-base (one; two
    in read-only mode: NAME-rw's RAM layer over NAME-ro's store), each in
    dm-snapshot's persistent format (setup keeps even the RAM layer's so,
    in its tmpfs file), whose exception tables name every chunk that
    differs from the base; None (copy all of NAME-rw) for any other stack,
    such as a thin pool."""
    # setup's snapshots stand on the device NAME-base maps whole (linear, at 0)
    base = {f"{os.major(base_dev)}:{os.minor(base_dev)}"}
    linear = run(["dmsetup", "table", names.base]).stdout.split()
    if len(linear) == 5 and linear[0] == "0" and linear[2] == "linear" and linear[4] == "0":
        base.add(linear[3])
    found = []
    device = names.rw
    for _ in range(2):
        fields = run(["dmsetup", "table", device]).stdout.split()
        if len(fields) != 7 or fields[2] != "snapshot" or fields[5].upper() not in ("P", "PO") \
                or not fields[6].isdigit():
            return None
        node = _node(fields[4])
        chunk_bytes = int(fields[6]) * SECTOR
        header = persistent.read_header(read_direct(node, 0, SECTOR),
                                        where=f"{device}'s store")
        if header.chunk_sectors * SECTOR != chunk_bytes:
            return None
        found.append(_Store(node, chunk_bytes))
        if fields[3] in base:
            return found
        if device != names.rw or _dm_name(fields[3]) != names.ro:
            return None
        device = names.ro
    return None


def _dm_name(devno: str) -> str:
    try:
        return (SYS_DEV_BLOCK / devno / "dm/name").read_text().strip()
    except OSError:
        return ""


def _node(devno: str) -> str:
    """A device node for "MAJOR:MINOR", found through sysfs and checked."""
    try:
        uevent = (SYS_DEV_BLOCK / devno / "uevent").read_text()
    except OSError:
        raise OverlayError(f"device {devno}: not a block device the kernel knows") from None
    names = [line.split("=", 1)[1] for line in uevent.splitlines()
             if line.startswith("DEVNAME=")]
    path = f"/dev/{names[0]}" if names else ""
    try:
        st = os.stat(path)
    except OSError:
        raise OverlayError(f"device {devno}: no node for it in /dev") from None
    if not stat.S_ISBLK(st.st_mode) or f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" \
            != devno:
        raise OverlayError(f"{path}: not device {devno}", hint="something planted it there")
    return path


# ----------------------------------------------------------------- the copies


def _copy_base(base: str, copy: Path) -> int:
    """NAME-base into `copy`, its zero blocks left as holes; its size."""
    src = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = size_of(src)
        with open(copy, "xb") as out:
            for offset in range(0, size, BLOCK):
                block = os.pread(src, min(BLOCK, size - offset), offset)
                if block.count(0) != len(block):
                    out.seek(offset)
                    out.write(block)
            out.truncate(size)
    finally:
        os.close(src)
    return size


def _empty_copy(rw: str, copy: Path) -> int:
    fd = os.open(rw, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = size_of(fd)
    finally:
        os.close(fd)
    with open(copy, "xb") as out:
        out.truncate(size)
    return size


def _copy_changes(live: str, rw: str, copy: Path, size: int, stores: list[_Store] | None,
                  limit: float) -> tuple[float, int]:
    """With the live root frozen: the chunks the store holds (or all of
    NAME-rw) copied over `copy`.  (seconds frozen, bytes copied)"""
    src = open_direct(rw)
    out = os.open(copy, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if size_of(src) != size:
            raise OverlayError(f"{rw} is {size_of(src)} bytes, its base {size}",
                               hint="the overlay is not one setup made: look at it")
        with _frozen(live, limit) as started:
            ranges = _store_ranges(stores, size) if stores is not None else \
                [(offset, min(BLOCK, size - offset)) for offset in range(0, size, BLOCK)]
            copied = 0
            for offset, length in ranges:
                block = pread_direct(src, offset, length)
                if len(block) != length:
                    raise OverlayError(f"{rw}: short read at {offset}")
                # over the base every chunk is written; into an empty copy,
                # zeros are left as holes
                if stores is not None or block.count(0) != length:
                    os.pwrite(out, block, offset)
                copied += length
            os.fsync(out)
            frozen = time.monotonic() - started
    finally:
        os.close(out)
        os.close(src)
    return frozen, copied


def _store_ranges(stores: list[_Store], size: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk any of `stores` holds, in order."""
    starts: set[tuple[int, int]] = set()
    for store in stores:
        chunk = store.chunk_bytes
        fd = open_direct(store.device)
        try:
            def read_chunk(n: int, fd: int = fd, chunk: int = chunk) -> bytes:
                return pread_direct(fd, n * chunk, chunk)

            found = persistent.exceptions(
                read_chunk, chunk_bytes=chunk, store_chunks=size_of(fd) // chunk,
                base_chunks=-(-size // chunk), where=store.device)
        finally:
            os.close(fd)
        starts |= {(old * chunk, chunk) for old, _ in found}
    return [(offset, min(length, size - offset)) for offset, length in sorted(starts)]


@contextmanager
def _frozen(mountpoint: str, limit: float) -> Iterator[float]:
    """`mountpoint`'s filesystem frozen while the block runs; the time it
    was frozen at.  The guard thaws it after `limit` seconds whatever
    happens to this process; if it had to, the block's work is refused."""
    fsfreeze = find_tool("fsfreeze") or "fsfreeze"
    # a module first imported meanwhile would write its .pyc on the frozen root
    # (at / once the boot switched to it) and wait for the guard
    sys.dont_write_bytecode = True
    guard = subprocess.Popen(
        ["sh", "-c", 'sleep "$1"; exec "$2" --unfreeze "$3"', "sh", f"{limit:g}", fsfreeze,
         mountpoint], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run([fsfreeze, "--freeze", mountpoint])
    except CommandFailed as exc:
        guard.kill()
        guard.wait()
        raise OverlayError(f"cannot freeze {mountpoint} ({exc.message})",
                           hint="the live root's filesystem must support freezing (ext4 "
                                "does)") from None
    started = time.monotonic()
    failed = None
    try:
        yield started
    finally:
        # the guard thawed the root already, or would have by now (it may
        # start late: a copy past the limit is refused either way)
        cut = guard.poll() is not None or time.monotonic() - started > limit
        guard.kill()
        guard.wait()
        thawed = run([fsfreeze, "--unfreeze", mountpoint], check=False)
        if thawed.returncode != 0 and not cut:
            failed = OverlayError(f"cannot thaw {mountpoint}: {thawed.stderr.strip()}",
                                  hint=f"thaw it by hand: fsfreeze --unfreeze {mountpoint}")
        elif cut or thawed.returncode != 0:
            failed = OverlayError(f"{mountpoint} stayed frozen past --freeze-limit "
                                  f"({limit:g} s) and was thawed: the copy is not one "
                                  "instant's, and nothing was made",
                                  hint="give a longer --freeze-limit, or bake when less "
                                       "has changed")
    if failed is not None:
        raise failed


# ------------------------------------------------------------------- the tree


@contextmanager
def _tree(copy: Path, work: Path) -> Iterator[Path]:
    """The copy's filesystem mounted read-only at a directory in `work`,
    dmoverlay's journal taken out first."""
    point = work / "root"
    point.mkdir(mode=0o700)
    loop = blockdev.loop_setup(copy, read_only=False)
    try:
        options = "nodev,nosuid,noexec"
        with blockdev.mounted(loop, point, fstype="ext4", options=options):
            _drop_journal(point)
        with blockdev.mounted(loop, point, fstype="ext4", options="ro,noload," + options):
            yield point
    finally:
        blockdev.loop_teardown(loop, backing=copy)


def _drop_journal(top: Path) -> None:
    where = top / JOURNAL_TOP
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        return
    top_st = os.lstat(top)
    if stat.S_ISDIR(st.st_mode):
        remove_tree(where)
    else:
        os.unlink(where)  # not apply's journal: it is not part of the system either
    # the top as the live root shows it, not as its removal left it
    os.utime(top, ns=(top_st.st_atime_ns, top_st.st_mtime_ns))

