"""A persistent overlay, decided without touching the kernel: where it is
(dracut's rd.live.overlay=<device>:<path>), whether a file holds a
dm-snapshot store, and whether its size is usable.

The store is dm-snapshot's persistent format.  Its first chunk is a header
(little-endian u32s): magic "SnAp", valid (1, or 0 once the kernel gave up
on it), version (1), chunk size in sectors.  A zero magic is a new, empty
store: that is why zeroing the first 64 KiB (rd.live.overlay.reset) starts
it afresh, and why a new overlay file needs nothing written to it."""

from __future__ import annotations

import posixpath
import struct
from dataclasses import dataclass
from enum import StrEnum

from dmoverlay.core.errors import ImageError, UsageError
from dmoverlay.core.sizes import KiB, MiB, format_size
from dmoverlay.core.superblock import Kind, detect
from dmoverlay.overlay import devspec
from dmoverlay.overlay.dmtable import CHUNK_SECTORS, SECTOR, cow_file_size

STORE_MAGIC = b"SnAp"
STORE_VERSION = 1
# dracut's rd.live.overlay.reset: more than the header, so that no stale
# exception table survives beside a new header either
RESET_BYTES = 64 * KiB
MIN_STORE = MiB
AUTO = "auto"


@dataclass(frozen=True)
class OverlaySpec:
    """Where the persistent overlay is, parsed from --overlay's text once.

    where None: `path` is the overlay file itself, on a filesystem that is
    mounted already.  Otherwise `where` (a LABEL=/UUID=/... spec, a /dev
    node, or a filesystem image file) is mounted and `path` is the file in
    it; path None is dracut's `auto`: the device itself when it holds no
    filesystem (a raw overlay partition), else /<live dir>/overlay-<label>-<uuid>
    of the live medium."""

    where: devspec.Location | None
    path: str | None
    text: str

    @property
    def device(self) -> str | None:
        """The device as written: what messages name."""
        return self.where.text if self.where else None


def parse_spec(text: str, *, option: str = "--overlay") -> OverlaySpec:
    """`DEVICE:PATH`, `DEVICE` (PATH auto) or a plain `FILE`.

    DEVICE is a spec (LABEL=, UUID=, PARTUUID=, PARTLABEL=, CDLABEL=), split
    at its first ':'; a /dev node or filesystem image file is split at its
    last ':' followed by '/' or `auto`.  Anything else is a plain file."""
    if not text.strip():
        raise UsageError(f"empty {option}", hint="give DEVICE:PATH, DEVICE or FILE")
    device, path = _split(text, option)
    return OverlaySpec(None if device is None else _device(device, text, option), path, text)


def _split(text: str, option: str) -> tuple[str | None, str | None]:
    """(device, path in it; None: auto) as written, or (None, file)."""
    if "=" in text and text.partition("=")[0] in devspec.KEYS:
        device, _, path = text.partition(":")
        return device, _inner_path(path, text, option)
    head, sep, tail = text.rpartition(":")
    if sep and head and (tail in ("", AUTO) or tail.startswith("/")):
        return head, _inner_path(tail, text, option)
    if text.startswith("/dev/"):
        return text, None
    return None, text


def _device(device: str, text: str, option: str) -> devspec.Location:
    try:
        return devspec.location(device)
    except UsageError as exc:
        raise UsageError(f"{option} {text}: {exc.message}", hint=exc.hint) from None


def _inner_path(path: str, text: str, option: str) -> str | None:
    if path in ("", AUTO):
        return None
    if not path.startswith("/") or ".." in path.split("/"):
        raise UsageError(f"{option} {text}: the path inside the device must be absolute, "
                         "without '..'", hint="e.g. LABEL=LIVE:/LiveOS/overlay-LIVE")
    return posixpath.normpath(path)


def auto_path(live_dir: str, label: str, uuid: str) -> str:
    """dracut's default overlay file on the overlay device, named after the
    live medium, which must then have a label or a UUID (an image file has
    neither: `overlay--` would name no medium at all)."""
    if not label and not uuid:
        raise UsageError("--overlay without a path: the file is named after the live "
                         "medium's label and UUID, and this medium has neither",
                         hint="give the path: --overlay DEVICE:/LiveOS/overlay")
    return f"/{live_dir}/overlay-{label}-{uuid}"


class Store(StrEnum):
    NEW = "new"  # zero magic: the kernel writes a header on first use
    VALID = "valid"


@dataclass(frozen=True)
class StoreHeader:
    state: Store
    chunk_sectors: int = CHUNK_SECTORS


def read_header(head: bytes, *, where: str, probed: str = "") -> StoreHeader:
    """What the first bytes of an overlay file say (`probed`: what blkid
    found in it); anything that is not a usable store is refused: it is
    someone's data, or a store the kernel gave up on.

    The kernel itself looks at the magic only, and takes a zero one for a new
    store, which it would write over: a filesystem's first bytes are often
    zero (ext4's boot block), so anything recognisable is refused as well."""
    if len(head) < 16:
        raise ImageError(f"{where}: too short to hold a snapshot store")
    magic = head[:4]
    valid, version, chunk = struct.unpack_from("<III", head, 4)
    kind = detect(head)
    foreign = probed if probed not in ("", "DM_snapshot_cow") else \
        (kind.value if kind is not Kind.UNKNOWN else "")
    reset = "--overlay-reset makes it a new, empty overlay (what it holds is lost)"
    if magic == bytes(4) and not foreign:
        return StoreHeader(Store.NEW)
    if magic != STORE_MAGIC or foreign:
        what = f"it holds {foreign} data" if foreign else "unknown content"
        raise ImageError(f"{where}: not a snapshot overlay store ({what})",
                         hint=f"check the path; {reset}")
    if valid != 1:
        raise ImageError(f"{where}: the kernel marked this overlay store invalid "
                         "(it filled up, or a write failed)", hint=reset)
    if version != STORE_VERSION or chunk == 0 or chunk & (chunk - 1):
        raise ImageError(f"{where}: unsupported snapshot store (version {version}, "
                         f"chunk size {chunk} sectors)", hint=reset)
    return StoreHeader(Store.VALID, chunk)


def check_size(size: int, *, wanted: int | None, where: str) -> None:
    """An existing overlay file: large enough, whole sectors, and the size
    asked for (a store cannot be resized in place)."""
    if size < MIN_STORE:
        raise ImageError(f"{where}: {format_size(size)} is too small for an overlay",
                         hint=f"it needs at least {format_size(MIN_STORE)}")
    if size % SECTOR:
        raise ImageError(f"{where}: {size} bytes is not a whole number of sectors",
                         hint="this is not an overlay file")
    if wanted is not None and cow_file_size(wanted) != size:
        raise UsageError(f"{where} is {format_size(size)}, not the "
                         f"--overlay-size {format_size(wanted)} asked for",
                         hint="leave out --overlay-size to use it as it is")


def new_size(wanted: int | None, *, where: str) -> int:
    """The size of an overlay file about to be made."""
    if wanted is None:
        raise UsageError(f"{where}: no such overlay file",
                         hint="give --overlay-size to create it (rd.live.overlay.size)")
    if wanted < MIN_STORE:
        raise UsageError(f"overlay size {format_size(wanted)} is too small",
                         hint=f"give {format_size(MIN_STORE)} or more")
    return cow_file_size(wanted)
