"""How much room is left in a dm-snapshot's copy-on-write store.

The snapshot's own count (`dmsetup status`) is one limit; a COW file on a
tmpfs is another, often smaller one: the file is sparse, and RAM runs out
long before its nominal size.  The free space is the smaller of the two.

Both jobs on a live system read it: `status` shows the fill, and `apply`
checks that an update fits before it writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dmoverlay.core.errors import DmoverlayError
from dmoverlay.core.run import find_tool, run

SECTOR = 512
THIN_BLOCK_SECTORS = 128  # 64 KiB: dm-thin's smallest block


class State(StrEnum):
    ACTIVE = "active"
    INVALID = "invalid"  # an N store that filled up: every read and write fails
    OVERFLOW = "overflow"  # a PO store that filled up: reads work, writes fail
    MERGING = "merging"


@dataclass(frozen=True)
class SnapshotStatus:
    state: State
    allocated: int = 0  # sectors of the COW store in use (data and metadata)
    total: int = 0  # sectors of the COW store
    metadata: int = 0

    @property
    def used_bytes(self) -> int:
        return self.allocated * SECTOR

    @property
    def total_bytes(self) -> int:
        return self.total * SECTOR

    @property
    def free_bytes(self) -> int:
        if self.state is not State.ACTIVE:
            return 0
        return max(0, self.total - self.allocated) * SECTOR

    @property
    def percent(self) -> float:
        return 100.0 * self.allocated / self.total if self.total else 100.0


def parse_status(line: str) -> SnapshotStatus:
    """One line of `dmsetup status` for a snapshot target:
    `<start> <length> snapshot <allocated>/<total> <metadata>`, or `Invalid`,
    or `Overflow` in place of the numbers."""
    fields = line.split()
    if len(fields) < 4 or fields[2] != "snapshot":
        raise DmoverlayError(f"not a snapshot status line: {line.strip()!r}")
    word = fields[3]
    if word == "Invalid":
        return SnapshotStatus(State.INVALID)
    if word == "Overflow":
        return SnapshotStatus(State.OVERFLOW)
    if word == "Merge" or "/" not in word:
        return SnapshotStatus(State.MERGING)
    allocated, _, total = word.partition("/")
    metadata = int(fields[4]) if len(fields) > 4 and fields[4].isdigit() else 0
    return SnapshotStatus(State.ACTIVE, int(allocated), int(total), metadata)

@dataclass(frozen=True)
class PoolStatus:
    """`<start> <len> thin-pool <transaction> <meta used>/<total> <data used>/<total>
    <held root> ro|rw|out_of_data_space ...`, or `Fail`; data in pool blocks."""

    state: str  # active | full | failed | read-only
    used: int = 0  # bytes
    total: int = 0


def parse_pool_status(line: str, block_sectors: int = THIN_BLOCK_SECTORS) -> PoolStatus:
    """`block_sectors`: the pool's data block, from its table (ours by default)."""
    fields = line.split()
    if len(fields) < 4 or fields[2] != "thin-pool":
        raise ValueError(f"not a thin-pool status line: {line.strip()!r}")
    if len(fields) < 8 or "/" not in fields[5]:
        return PoolStatus("failed")
    used, _, total = fields[5].partition("/")
    block = block_sectors * SECTOR
    mode = fields[7]
    state = {"rw": "active", "out_of_data_space": "full", "ro": "read-only"}.get(mode, "failed")
    return PoolStatus(state, int(used) * block, int(total) * block)



def dm_name(dev: int | str, *, sysfs: Path = Path("/sys")) -> str | None:
    """The device-mapper name of a block device (a number, or "major:minor"),
    or None if it is not a dm device."""
    devno = dev if isinstance(dev, str) else f"{os.major(dev)}:{os.minor(dev)}"
    try:
        return (sysfs / f"dev/block/{devno}/dm/name").read_text().strip()
    except OSError:
        return None


def backing_file(devno: str, *, sysfs: Path = Path("/sys")) -> Path | None:
    """The file behind a loop device given as major:minor, if it is one."""
    try:
        block = (sysfs / f"dev/block/{devno}").resolve().name
        return Path((sysfs / f"block/{block}/loop/backing_file").read_text().strip())
    except OSError:
        return None


def free_bytes(path: str) -> int | None:
    """Room left for new writes under the filesystem holding `path`: in its
    dm-snapshot's COW store, or its thin volume's pool; None when it is on
    neither (or dmsetup is missing)."""
    name = dm_name(os.stat(path).st_dev)
    if name is None or find_tool("dmsetup") is None:
        return None
    table = run(["dmsetup", "table", name]).stdout.split()
    # snapshot: <start> <len> snapshot <origin> <cow> <P|N|PO> <chunk>
    if len(table) >= 5 and table[2] == "snapshot":
        status = parse_status(run(["dmsetup", "status", name]).stdout)
        return _within_backing(status.free_bytes, table[4])
    # thin: <start> <len> thin <pool> <id> [<external origin>]
    if len(table) >= 4 and table[2] == "thin":
        return _pool_free(table[3])
    return None


def _pool_free(pool_devno: str) -> int | None:
    pool = dm_name(pool_devno)
    if pool is None:
        return None
    # <start> <len> thin-pool <metadata> <data> <block sectors> <low water mark> ...
    table = run(["dmsetup", "table", pool]).stdout.split()
    if len(table) < 6 or table[2] != "thin-pool":
        return None
    status = parse_pool_status(run(["dmsetup", "status", pool]).stdout, int(table[5]))
    free = status.total - status.used if status.state == "active" else 0
    return _within_backing(free, table[4])


def _within_backing(free: int, devno: str) -> int:
    """A store on a loop device over a sparse file (on tmpfs, say) also needs
    room in the file's filesystem; one allocated in full (a persistent
    overlay) does not."""
    backing = backing_file(devno)
    if backing is None:
        return free
    try:
        st = os.stat(backing)
        if st.st_blocks * SECTOR >= st.st_size:
            return free
        fs = os.statvfs(backing.parent)
    except OSError:
        return free
    return min(free, fs.f_bavail * fs.f_frsize)
