"""What an overlay is made of, decided without touching the kernel: names,
device-mapper tables and sizes (the record that lets teardown undo it is
`state`).

The snapshot store is `PO` (persistent, overflow-aware) with 4 KiB chunks,
as dracut's dmsquash-live uses for its tmpfs COW:
- PO, not N: when the COW fills up, an N snapshot turns Invalid and every
  read fails, taking the running system down with it; PO turns Overflow:
  writes fail, but reads (the whole system) keep working.  The price is a
  little metadata in the COW (one 4 KiB chunk per 256 data chunks).
- 8 sectors (4 KiB), ext4's block size: a scattered 4 KiB write copies one
  chunk; 64 KiB chunks used 16 times the COW for such writes.  The kernel
  keeps about 32 bytes of RAM per chunk in use: 8 MiB per GiB written.

A persistent overlay (a file or partition kept across boots) is a `PO`
store too, as dracut makes it: the on-disk format is the same as `P`'s, and
the O only changes what happens when it fills up.  With `P` the kernel
marks the store invalid on disk and every change ever saved in it is lost;
with `PO` it stays valid, and only the writes that did not fit fail.

A read-only persistent overlay (rd.live.overlay.readonly) is two layers:
`live-ro`, a read-only `P` snapshot of the base on the overlay (nothing is
ever written to it, so P and PO behave alike), and `live-rw`, the usual RAM
snapshot of `live-ro`.  What is written goes to RAM and is gone after
teardown; what the overlay held shows through.

The thin variant (rd.live.overlay.thin) replaces the RAM snapshot with a
thin volume whose external origin is the base, in a thin-pool on sparse
files in a tmpfs: deleting files and running fstrim gives the RAM back,
which a snapshot's COW never does.  The pool's block is 64 KiB, the
smallest dm-thin allows (dracut uses 512 KiB, which takes more RAM per
scattered write), and it errors when full instead of queueing writes
(the default, which would freeze the root for 60 s first)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from dmoverlay.core.cow import THIN_BLOCK_SECTORS
from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import MiB

SECTOR = 512
STORE = "PO"
CHUNK_SECTORS = 8
DEFAULT_NAME = "live"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")


@dataclass(frozen=True)
class Names:
    """dracut's device names for an overlay called `name`: live-rw, live-base."""

    name: str = DEFAULT_NAME

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise UsageError(f"overlay name {self.name!r} is not usable as a device name",
                             hint="letters, digits, '.', '_' and '-'")

    @property
    def rw(self) -> str:
        return f"{self.name}-rw"

    @property
    def base(self) -> str:
        return f"{self.name}-base"

    @property
    def ro(self) -> str:
        return f"{self.name}-ro"

    @property
    def pool(self) -> str:
        return f"{self.name}-overlay-pool"

    def all(self) -> tuple[str, ...]:
        return (self.rw, self.base, self.ro, self.pool)


def snapshot_table(*, sectors: int, origin: str, cow: str, store: str = STORE,
                   chunk: int = CHUNK_SECTORS) -> str:
    return f"0 {sectors} snapshot {origin} {cow} {store} {chunk}"


def linear_table(*, sectors: int, device: str) -> str:
    return f"0 {sectors} linear {device} 0"




class Mode(StrEnum):
    RAM = "ram"  # live-rw: PO snapshot of the base, COW on tmpfs (the default)
    PERSISTENT = "persistent"  # live-rw: PO snapshot of the base, COW on the overlay
    READONLY = "readonly"  # live-ro: P snapshot on the overlay; live-rw: RAM over it


@dataclass(frozen=True)
class ThinPool:
    """The sparse files behind a thin-pool, attached: metadata and data."""

    meta: str
    data: str
    data_sectors: int


@dataclass(frozen=True)
class Device:
    """One device-mapper device to create, in order."""

    name: str
    table: str
    read_only: bool
    messages: tuple[str, ...] = ()  # sent to it once created


def layout(names: Names, *, sectors: int, base: str, mode: Mode, cow: str = "",
           persistent: str = "", thin: ThinPool | None = None) -> tuple[Device, ...]:
    """Which device-mapper devices an overlay is, each over the ones before it.

    `base` is the read-only device of rootfs.img, `cow` the RAM COW device,
    `persistent` the overlay device, `thin` the pool's devices (instead of cow)."""
    if mode is not Mode.RAM and not persistent:
        raise ValueError(f"{mode} needs the persistent overlay device")
    devices = [Device(names.base, linear_table(sectors=sectors, device=base), read_only=True)]
    lower = base
    if mode is Mode.PERSISTENT:
        devices.append(Device(names.rw, snapshot_table(sectors=sectors, origin=base,
                                                       cow=persistent), read_only=False))
        return tuple(devices)
    if mode is Mode.READONLY:
        devices.append(Device(names.ro, snapshot_table(sectors=sectors, origin=base,
                                                       cow=persistent, store="P"),
                              read_only=True))
        lower = f"/dev/mapper/{names.ro}"
    if thin is not None:
        devices.append(Device(names.pool, thin_pool_table(thin), read_only=False,
                              messages=("create_thin 0",)))
        devices.append(Device(names.rw, f"0 {sectors} thin /dev/mapper/{names.pool} 0 {lower}",
                              read_only=False))
    elif cow:
        devices.append(Device(names.rw, snapshot_table(sectors=sectors, origin=lower, cow=cow),
                              read_only=False))
    else:
        raise ValueError("a RAM layer needs a COW device or a thin pool")
    return tuple(devices)


def thin_pool_table(pool: ThinPool) -> str:
    # the low-water mark (free blocks) only sends an event, which nobody
    # listens to here; a tenth of the pool keeps it below the pool's size
    low_water = max(1, pool.data_sectors // THIN_BLOCK_SECTORS // 10)
    return (f"0 {pool.data_sectors} thin-pool {pool.meta} {pool.data} {THIN_BLOCK_SECTORS} "
            f"{low_water} 1 error_if_no_space")


def thin_sizes(overlay_size: int) -> tuple[int, int]:
    """(metadata, data) file sizes of a thin pool holding `overlay_size`.
    Both files are sparse, so the metadata room is generous: 1 KiB per
    64 KiB block, many times what its btrees take."""
    block = THIN_BLOCK_SECTORS * SECTOR
    data = max(16 * block, overlay_size // block * block)
    meta = max(4 * MiB, data // 64 // 4096 * 4096)
    return meta, data


def cow_file_size(overlay_size: int) -> int:
    """The sparse COW file: the overlay size, in whole chunks."""
    chunk = CHUNK_SECTORS * SECTOR
    return max(chunk * 16, overlay_size // chunk * chunk)
