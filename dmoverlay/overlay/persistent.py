"""A persistent overlay, decided without touching the kernel: where it is
(dracut's rd.live.overlay=<device>:<path>; a path named in it is looked at,
what it is and its first bytes, nothing more), whether a file holds a
dm-snapshot store, and whether its size is usable.

The store is dm-snapshot's persistent format.  Its first chunk is a header
(little-endian u32s): magic "SnAp", valid (1, or 0 once the kernel gave up
on it), version (1), chunk size in sectors.  A zero magic is a new, empty
store: that is why zeroing the first 64 KiB (rd.live.overlay.reset) starts
it afresh, and why a new overlay file needs nothing written to it."""

from __future__ import annotations

import os
import posixpath
import stat
import struct
from collections.abc import Callable, Iterator
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


def parse_spec(text: str, *, option: str = "--overlay",
               probe: Callable[[str], Found] | None = None) -> OverlaySpec:
    """`DEVICE:PATH`, `DEVICE` (PATH auto) or a plain `FILE`, by one rule a
    user can predict (the README's table says it too):

    - DEVICE is a spec (LABEL=, UUID=, PARTUUID=, PARTLABEL=, CDLABEL=),
      split at its first ':' as dracut splits it; or a path under /dev/,
      decided by its text alone (at boot the node may not exist yet); or a
      block device or a file that holds a filesystem, as `probe` finds it.
    - Any other path is split only where what comes before is such a
      DEVICE: at the first ':/' that follows one; a final ':' or ':auto'
      (PATH auto) needs a DEVICE before it, or it is refused.
    - A path that exists as a whole is that FILE (a block device: that
      DEVICE), never split; so is any text that no DEVICE starts.  A FILE
      that holds a filesystem is no store: it is refused, pointing to
      FILE:auto."""
    if not text.strip():
        raise UsageError(f"empty {option}", hint="give DEVICE:PATH, DEVICE or FILE")
    device, path = _split(text, option, probe or probe_path)
    return OverlaySpec(None if device is None else _device(device, text, option), path, text)


class What(StrEnum):
    """What a path names, as far as reading --overlay's text cares."""

    MISSING = "missing"
    BLOCK = "block"
    FILE = "file"  # a regular file; `Found.filesystem` says what it holds
    OTHER = "other"  # a directory, a fifo...


@dataclass(frozen=True)
class Found:
    what: What
    filesystem: str = ""  # a FILE: the filesystem it holds ("" none known)

    @property
    def is_device(self) -> bool:
        return self.what is What.BLOCK or bool(self.filesystem)


# enough for every signature filesystem_in reads (ISO 9660's is at 32 KiB)
PROBE_BYTES = 36 * KiB


def probe_path(path: str) -> Found:
    """What `path` names, where it resolves: a file's first bytes are read
    (never a fifo's or a device's: opening one may block or have effects)."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            return Found(What.BLOCK if stat.S_ISBLK(mode) else What.OTHER)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return Found(What.MISSING)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the text
        why = exc.strerror if isinstance(exc, OSError) else "not a path"
        raise UsageError(f"{path}: cannot read it ({why})",
                         hint="--overlay looks at a file to tell a filesystem image from "
                              "an overlay file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
            return Found(What.OTHER)
        return Found(What.FILE, filesystem_in(f.read(PROBE_BYTES)))


def filesystem_in(head: bytes) -> str:
    """The filesystem a file's first bytes hold, of those a live medium or
    an overlay's device has ("" none): ISO 9660 first, since a hybrid ISO
    starts with a partition table as well."""
    if head[32769:32774] == b"CD001":
        return "iso9660"
    kind = detect(head)
    if kind in (Kind.EXT, Kind.SQUASHFS):
        return kind.value
    fat = b"FAT" in head[0x36:0x3E] or b"FAT" in head[0x52:0x5A]
    return "vfat" if head[510:512] == b"\x55\xaa" and fat else ""


def _split(text: str, option: str, probe: Callable[[str], Found]) -> tuple[str | None, str | None]:
    """(device, path in it; None: auto) as written, or (None, file)."""
    if devspec.looks_like_spec(text):
        prefix = "live:" if text.startswith("live:") else ""  # root=live:'s, taken here too
        device, _, path = text.removeprefix(prefix).partition(":")
        return prefix + device, _inner_path(path, text, option)
    if posixpath.normpath(text).startswith("/dev/"):
        for head, path in _splits(text):
            return head, _inner_path(path, text, option)
        return text, None
    whole = probe(text)
    if whole.what is What.BLOCK:  # a device node outside /dev: that DEVICE, PATH auto
        return text, None
    if whole.what is not What.MISSING:
        if whole.filesystem:
            raise UsageError(f"{option} {text}: it holds a filesystem ({whole.filesystem}), "
                             "not an overlay store",
                             hint=f"to keep the overlay in a file on it, name that file: "
                                  f"{text}:auto (dracut's /LiveOS/overlay-<label>-<uuid>) or "
                                  f"{text}:/PATH")
        return None, text
    for head, path in _splits(text):
        found = probe(head)
        if found.is_device:
            return head, _inner_path(path, text, option)
        if found.what is What.FILE:
            raise UsageError(f"{option} {text}: {head} holds no filesystem to keep "
                             f"{'the overlay' if path == AUTO else path} in (ext2/3/4, vfat, "
                             "iso9660, squashfs)",
                             hint="check the path; an overlay file whose own path has ':/' "
                                  "in it: create it first (truncate -s SIZE), then name it")
        if path == AUTO:
            raise UsageError(f"{option} {text}: {head} is not a device nor a filesystem image",
                             hint="check the path")
    return None, text


def _splits(text: str) -> Iterator[tuple[str, str]]:
    """Where DEVICE:PATH may split, in order: at each ':/', then at a final
    ':' or ':auto'."""
    at = text.find(":/")
    while at != -1:
        if at:
            yield text[:at], text[at + 1:]
        at = text.find(":/", at + 1)
    for tail in (":" + AUTO, ":"):
        if text.endswith(tail) and len(text) > len(tail):
            yield text[:-len(tail)], AUTO
            return


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


# One exception: (chunk of the base, chunk of the store holding its data).
EXCEPTION = struct.Struct("<QQ")


def exceptions(read_chunk: Callable[[int], bytes], *, chunk_bytes: int, store_chunks: int,
               base_chunks: int, where: str) -> list[tuple[int, int]]:
    """(base chunk, store chunk) for every chunk a valid store holds, in
    dm-snapshot's persistent layout: after the header chunk, metadata areas
    of `chunk_bytes`/16 entries (u64 base chunk, u64 store chunk, little
    endian), each followed by the data chunks it maps; an entry whose store
    chunk is 0 ends the table.  `read_chunk(n)` gives chunk n of the store.
    An entry that points outside its area or past the base is the store's
    damage (ImageError): nothing is copied from such a store."""
    per_area = chunk_bytes // EXCEPTION.size
    found: list[tuple[int, int]] = []
    area = 1
    while area < store_chunks:
        table = read_chunk(area)
        if len(table) != chunk_bytes:
            raise ImageError(f"{where}: the store ends inside its metadata area at chunk {area}")
        for i in range(per_area):
            old, new = EXCEPTION.unpack_from(table, i * EXCEPTION.size)
            if new == 0:
                return found
            if not area < new <= min(area + per_area, store_chunks - 1) or old >= base_chunks:
                raise ImageError(f"{where}: damaged store: entry {len(found)} maps base chunk "
                                 f"{old} to store chunk {new}, outside the area at chunk "
                                 f"{area} or past the base ({base_chunks} chunks)",
                                 hint="--overlay-reset starts it afresh (what it holds is lost)")
            found.append((old, new))
        area += per_area + 1
    return found  # the store is full: its last area ends at its end
