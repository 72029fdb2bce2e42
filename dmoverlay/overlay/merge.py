"""`dmoverlay merge BASE STORE`: a persistent overlay's changes folded into
its base by the kernel's snapshot-merge target, offline (neither is in use:
not set up, not mounted).

Checked before: BASE is an ext2/3/4 filesystem (a partition or an image
file) that can be written; STORE is a valid dm-snapshot store that records
BASE as its base (one without a record, as dracut makes them, only with
--force: a merge into the wrong base cannot be undone); its exception table
is read and bounds-checked, and each chunk it holds digested.

The merge: files on loop devices, then NAME-merge = `snapshot-merge BASE
STORE P CHUNK`.  The kernel copies the chunks into the base and drops them
from the store's table as it goes, committed on the store, so a merge cut
short (a crash, a stall, --timeout, Ctrl-C) goes on from where it stopped
when merge runs again.  A NAME-merge left by a merge that was killed is
taken down first (the kernel stops merging at a commit) with the loop
devices in its table, and the merge made again over what is left.

Checked after: the store's table is empty and every chunk it held is in the
base, digest for digest; the store is then made a new, empty store that
records the merged base, so it can be set up over it again."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.direct import open_direct, pread_direct, read_direct, size_of
from dmoverlay.core.errors import CommandFailed, OverlayError, UsageError
from dmoverlay.core.run import run
from dmoverlay.core.superblock import Kind, detect
from dmoverlay.overlay import baseid, blockdev, kernel, persistent
from dmoverlay.overlay.dmtable import SECTOR, Names
from dmoverlay.overlay.store import write_at

POLL = 0.5  # seconds between looks at the merge
STALL = 120.0  # seconds without a chunk merged: stalled


@dataclass(frozen=True)
class Merged:
    chunks: int  # the store held this many when this merge started
    seconds: float
    resumed: bool  # a merge cut short was found and gone on with


@dataclass(frozen=True)
class Progress:
    """What `dmsetup status` says of a snapshot-merge device: sectors in use
    in the store (data and metadata) and of them metadata; the merge is
    done when only metadata is left."""

    allocated: int
    metadata: int

    @property
    def data_sectors(self) -> int:
        return self.allocated - self.metadata


def parse_progress(line: str) -> Progress:
    """`<start> <length> snapshot-merge <allocated>/<total> <metadata>`;
    anything else there (Invalid, Overflow, Merge failed) is a failed merge."""
    fields = line.split()
    if len(fields) < 3 or fields[2] != "snapshot-merge":
        raise OverlayError(f"not a snapshot-merge status line: {line.strip()[:200]!r}")
    used, slash, _ = fields[3].partition("/") if len(fields) > 3 else ("", "", "")
    if len(fields) != 5 or not slash or not used.isdigit() or not fields[4].isdigit() \
            or int(fields[4]) > int(used):
        said = " ".join(fields[3:])[:200]
        raise OverlayError(f"the merge failed: the kernel says {said!r}",
                           hint="the store or the base had an I/O error: look at dmesg; what "
                                "was merged stays merged")
    return Progress(int(used), int(fields[4]))


def merge(base: str, store: str, *, name: str = "live", force: bool = False,
          timeout: float | None = None, stall: float = STALL,
          say: Callable[[str], None] = log.info) -> Merged:
    """Fold `store` into `base` (paths of a file or a block device)."""
    if os.geteuid() != 0:
        raise OverlayError("merging needs root", hint="run it as root: it uses device-mapper")
    device = Names(name).name + "-merge"
    base_size = _size(base, "BASE")
    head = read_direct(base, 0, baseid.HEAD_BYTES)
    if detect(head) is not Kind.EXT:
        raise UsageError(f"{base}: holds no ext2/3/4 filesystem, which merge folds into",
                         hint="a squashfs.img is read-only: bake it instead (dmoverlay build "
                              "--from-live)")
    _size(store, "STORE")
    for path, what in ((base, "BASE"), (store, "STORE")):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path}: not writable ({what} is written)")
    identity = baseid.identify(head, base_size // SECTOR, where=base)
    chunk_bytes = _check_store(store, identity, force=force)
    # a merge that was killed holds both: its device and loop devices go first
    resumed = kernel.dm_exists(device) and _take_down_cut_short(device, base, store)
    for path, what in ((base, "BASE"), (store, "STORE")):
        _check_unused(path, what)
    held = _held(store, chunk_bytes, base_size)
    if not held:
        say(f"{store}: holds no changes: nothing to merge")
        _renew(store, base, chunk_bytes)
        return Merged(0, 0.0, resumed)
    if not baseid.merging_fits(chunk_bytes):
        log.warning(f"{store}: its chunks of {chunk_bytes} bytes leave no room for the mark "
                    "of a begun merge: a merge cut short cannot be gone on with (setup and "
                    "dracut make 4 KiB chunks)")
    kernel.require_target("snapshot-merge", "dm-snapshot", "CONFIG_DM_SNAPSHOT")
    digests = _digests(store, chunk_bytes, held)
    first = read_direct(store, 0, chunk_bytes)
    if baseid.merging_fits(chunk_bytes) and baseid.decode_merging(first, where=store) is None:
        write_at(store, baseid.MERGING_OFFSET, baseid.encode_merging(identity), store)
    started = time.monotonic()
    with ExitStack() as stack:
        base_dev = _attached(stack, base, base_size)
        store_dev = _attached(stack, store, _size(store, "STORE"))
        table = (f"0 {base_size // SECTOR} snapshot-merge {base_dev} {store_dev} P "
                 f"{chunk_bytes // SECTOR}")
        stack.callback(_remove, device)  # before it is made: an interruption may come then
        run(["dmsetup", "create", device, "--table", table])
        _wait(device, len(held), chunk_bytes, timeout=timeout, stall=stall, say=say)
    _check_merged(base, store, chunk_bytes, base_size, digests)
    _renew(store, base, chunk_bytes)
    return Merged(len(held), time.monotonic() - started, resumed)


# ------------------------------------------------------------------ before


def _size(path: str, what: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{what} {path}: not a file or a block device")
        size = size_of(fd)
    finally:
        os.close(fd)
    if size % SECTOR:
        raise UsageError(f"{what} {path}: {size} bytes, not whole sectors")
    return size


def _check_unused(path: str, what: str) -> None:
    real = os.path.realpath(path)
    st = os.stat(real)
    if stat.S_ISBLK(st.st_mode):
        devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        try:
            holders = os.listdir(f"/sys/dev/block/{devno}/holders")
        except OSError:
            holders = []  # a device without the directory holds nothing
        users = holders + (["a mount"] if st.st_rdev in _mounted_devices() else [])
    else:
        users = kernel.loops_backed_by(real)
    if users:
        raise OverlayError(f"{what} {path} is in use (by {', '.join(users)})",
                           hint="tear the overlay down first (dmoverlay teardown), or boot "
                                "without it")


def _mounted_devices() -> set[int]:
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            major, minor = line.split()[2].split(":")
            found.add(os.makedev(int(major), int(minor)))
    return found


def _check_store(store: str, identity: baseid.BaseIdentity, *, force: bool) -> int:
    """The store's chunk size in bytes, once it is judged a valid store of
    this base (or of none recorded, with --force)."""
    head = read_direct(store, 0, 64 * 1024)
    header = persistent.read_header(head, where=store)
    if header.state is persistent.Store.NEW:
        raise UsageError(f"{store}: a new, empty store: nothing to merge")
    chunk_bytes = header.chunk_sectors * SECTOR
    if not baseid.has_room(header.chunk_sectors):
        raise OverlayError(f"{store}: its one-sector chunks leave no room for the record of "
                           "its base, which merge needs")
    begun = baseid.decode_merging(head[:chunk_bytes], where=store)
    if begun is not None:  # half merged: the base's first chunks may be merged already
        if (begun.uuid, begun.sectors) != (identity.uuid, identity.sectors):
            raise OverlayError(f"{store}: a merge of it into {begun.describe()} was cut "
                               f"short; this base is {identity.describe()}",
                               hint="give the base the merge began with")
        return chunk_bytes
    recorded = baseid.decode(head, where=store)
    verdict = baseid.judge(recorded, identity, where=store)
    if verdict is baseid.Verdict.UNRECORDED and not force:
        raise OverlayError(f"{store}: no record of the base it belongs to (made by dracut?): "
                           "merging it into another base would corrupt that one for good",
                           hint=f"give --force if it was made over {identity.describe()}")
    return chunk_bytes


def _held(store: str, chunk_bytes: int, base_size: int) -> list[tuple[int, int]]:
    fd = open_direct(store)
    try:
        return persistent.exceptions(
            lambda n: pread_direct(fd, n * chunk_bytes, chunk_bytes), chunk_bytes=chunk_bytes,
            store_chunks=size_of(fd) // chunk_bytes,
            base_chunks=-(-base_size // chunk_bytes), where=store)
    finally:
        os.close(fd)


def _digests(store: str, chunk_bytes: int, held: list[tuple[int, int]]) -> dict[int, bytes]:
    """Base chunk -> the digest of the data the store holds for it (the
    last entry for a chunk wins, as in the kernel's table)."""
    fd = open_direct(store)
    try:
        return {old: hashlib.sha256(pread_direct(fd, new * chunk_bytes, chunk_bytes)).digest()
                for old, new in held}
    finally:
        os.close(fd)


# ------------------------------------------------------------------ merging


def _attached(stack: ExitStack, path: str, size: int) -> str:
    """"MAJOR:MINOR" of `path`: itself if a block device, else a loop
    device attached for as long as `stack` (read-write)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    kernel.require_loop()
    loop = blockdev.loop_setup(path, read_only=False)
    stack.callback(blockdev.loop_teardown, loop, backing=path)
    rdev = os.stat(loop).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _remove(device: str) -> None:
    # the kernel stops a merge at a commit when its device goes: resumable
    if not kernel.dm_exists(device):
        return  # never made (dmsetup create failed), or gone already
    for attempt in range(5):
        try:
            run(kernel.dm_remove_argv(device))
            return
        except CommandFailed:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _wait(device: str, total: int, chunk_bytes: int, *, timeout: float | None, stall: float,
          say: Callable[[str], None]) -> None:
    chunk_sectors = chunk_bytes // SECTOR
    started = last_change = time.monotonic()
    last_left = total
    said = -1
    while True:
        progress = parse_progress(run(["dmsetup", "status", device]).stdout)
        left = progress.data_sectors // chunk_sectors
        now = time.monotonic()
        done = total - left
        percent = 100 * done // total
        if percent // 10 != said // 10 or left == 0:
            say(f"  merged {done} of {total} chunks ({percent}%)")
            said = percent
        if left == 0:
            return
        if left != last_left:
            last_left, last_change = left, now
        cut = None
        if timeout is not None and now - started > timeout:
            cut = f"--timeout ({timeout:g} s) passed"
        elif now - last_change > stall:
            cut = f"no chunk merged in {stall:g} s"
        if cut:
            raise OverlayError(f"the merge stopped with {left} of {total} chunks left: {cut}",
                               hint="what was merged stays merged: run merge again to go on")
        time.sleep(POLL)


def _take_down_cut_short(device: str, base: str, store: str) -> bool:
    """A NAME-merge left by a merge that was killed: taken down with the
    loop devices in its table, if those are BASE and STORE; refused if it
    is anything else."""
    table = run(["dmsetup", "table", device], check=False)
    if table.returncode != 0:
        return False
    fields = table.stdout.split()
    if len(fields) != 7 or fields[2] != "snapshot-merge":
        raise OverlayError(f"a device {device} exists and is not a merge",
                           hint="give another --name")
    devices = [_devno_path(devno) for devno in (fields[3], fields[4])]
    for path, (node, backing) in zip((base, store), devices, strict=True):
        if not _same(path, node) and not (backing and _same(path, backing)):
            raise OverlayError(f"a merge {device} of other devices is under way",
                               hint="wait for it, or give another --name")
    log.warning(f"{device}: a merge was cut short; going on with it")
    _remove(device)
    for node, backing in devices:
        if backing is not None:
            blockdev.loop_teardown(node, backing=backing)
    return True


def _devno_path(devno: str) -> tuple[str, str | None]:
    """(a node of device MAJOR:MINOR, the file behind it if it is a loop)."""
    sysfs = Path("/sys/dev/block") / devno
    try:
        name = next(line.split("=", 1)[1] for line in (sysfs / "uevent").read_text().splitlines()
                    if line.startswith("DEVNAME="))
    except (OSError, StopIteration):
        raise OverlayError(f"device {devno} of a merge under way is gone") from None
    try:
        backing = (sysfs / "loop/backing_file").read_text().strip() or None
    except OSError:
        backing = None
    return f"/dev/{name}", backing


def _same(a: str, b: str) -> bool:
    """The same file, or the same block device by any of its nodes."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# ------------------------------------------------------------------- after


def _check_merged(base: str, store: str, chunk_bytes: int, base_size: int,
                  digests: dict[int, bytes]) -> None:
    left = _held(store, chunk_bytes, base_size)
    if left:
        raise OverlayError(f"{store}: still holds {len(left)} chunks after the merge",
                           hint="run merge again")
    fd = open_direct(base)
    try:
        for old, want in sorted(digests.items()):
            got = hashlib.sha256(pread_direct(fd, old * chunk_bytes, chunk_bytes)).digest()
            if got != want:
                raise OverlayError(f"{base}: chunk {old} is not what the store held after "
                                   "the merge", hint="the base had a write error? look at "
                                                     "dmesg, and check it with e2fsck -fn")
    finally:
        os.close(fd)


def _renew(store: str, base: str, chunk_bytes: int) -> None:
    """The store made a new empty one that records the base as it is now."""
    head = read_direct(base, 0, baseid.HEAD_BYTES)
    identity = baseid.identify(head, _size(base, "BASE") // SECTOR, where=base)
    if not baseid.has_room(chunk_bytes // SECTOR):
        return
    write_at(store, 0, baseid.new_store(identity, chunk_bytes // SECTOR), store)

