"""What one setup is asked for, decided without touching the system: the
options, the combinations that mean nothing, and the RAM layer's size.

The texts (IMAGE, --overlay) are parsed once, where the options are made
(`parse_image`, `parse_overlay`): setup's steps get the parsed values."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import log, rundir
from dmoverlay.core.errors import OverlayError, UsageError
from dmoverlay.core.sizes import MiB, format_size
from dmoverlay.overlay import devspec, persistent
from dmoverlay.overlay.dmtable import Mode
from dmoverlay.overlay.persistent import OverlaySpec

STATE_DIR = Path("/run") / rundir.NAME  # shared with apply's staging


@dataclass(frozen=True)
class SetupOptions:
    image: devspec.Location  # a squashfs.img, rootfs.img, disk or medium; file or device
    target: Path
    name: str = "live"
    overlay_size: int | None = None  # RAM layer (None: half the RAM); or a new overlay file
    live_dir: str = "LiveOS"
    squashfs_name: str = "squashfs.img"
    tmpfs_dir: Path | None = None  # an existing tmpfs for the COW file; else our own
    state_dir: Path = STATE_DIR
    overlay: OverlaySpec | None = None  # persistent overlay: DEVICE:PATH, DEVICE or FILE
    overlay_reset: bool = False  # start the persistent overlay afresh
    overlay_readonly: bool = False  # show it, keep new writes in RAM
    overlay_thin: bool = False  # RAM layer as a thin volume: fstrim gives RAM back
    ram: bool = False  # copy the image into RAM, then let the medium go (rd.live.ram)

    @property
    def mode(self) -> Mode:
        if self.overlay is None:
            return Mode.RAM
        return Mode.READONLY if self.overlay_readonly else Mode.PERSISTENT


def parse_image(text: str) -> devspec.Location:
    """IMAGE: a path, or a device spec (LABEL=, UUID=...) that blkid resolves."""
    try:
        return devspec.location(text)
    except UsageError as exc:
        raise UsageError(f"IMAGE {text}: {exc.message}", hint=exc.hint) from None


def parse_overlay(text: str | None) -> OverlaySpec | None:
    """--overlay: where the persistent overlay is (None: no persistent overlay)."""
    return None if text is None else persistent.parse_spec(text)


def inner_name(value: str, *, option: str) -> str:
    """A path inside the medium (the live directory, the squashfs image's
    name): dracut joins it under the mount point, so a leading "/" means
    nothing more; ".." would leave the medium, and a control character has
    no place in a name written on a command line (nor in debugfs' request)."""
    path = value.strip("/")
    if not path or ".." in path.split("/") or not path.isprintable():
        raise UsageError("must be a path inside the medium, printable, without '..'",
                         hint=f"e.g. {option}=LiveOS")
    return posixpath.normpath(path)


# Each option as setup's command line spells it; the kernel command line
# passes its own spellings (rd.live.overlay.reset...), so that one set of
# rules speaks the words its user wrote.
FLAGS: Mapping[str, str] = {
    "live_dir": "--live-dir", "squashfs_name": "--squashfs-name", "overlay": "--overlay",
    "overlay_reset": "--overlay-reset", "overlay_readonly": "--overlay-readonly",
    "overlay_thin": "--overlay-thin", "tmpfs_dir": "--tmpfs-dir", "ram": "--ram",
}


def check_options(opts: SetupOptions, *, named: Mapping[str, str] = FLAGS) -> None:
    """Combinations that mean nothing, refused before anything is touched;
    `named`: how the caller's user spells each option."""
    name = {**FLAGS, **named}
    for field in ("live_dir", "squashfs_name"):
        value = getattr(opts, field)
        try:
            inner_name(value, option=name[field])
        except UsageError as exc:
            raise UsageError(f"{name[field]} {value!r}: {exc.message}", hint=exc.hint) from None
    if opts.overlay is None:
        for field in ("overlay_reset", "overlay_readonly"):
            if getattr(opts, field):
                raise UsageError(f"{name[field]} needs {name['overlay']}",
                                 hint=f"name the persistent overlay: {name['overlay']}="
                                      "DEVICE:PATH")
        return
    if opts.overlay_reset and opts.overlay_readonly:
        raise UsageError(f"{name['overlay_reset']} and {name['overlay_readonly']} contradict "
                         "each other", hint="a read-only overlay is never written")
    if opts.overlay_thin and not opts.overlay_readonly:
        raise UsageError(f"{name['overlay_thin']} with {name['overlay']} needs "
                         f"{name['overlay_readonly']}",
                         hint="writes go to a persistent overlay itself; only a read-only "
                              "one has a RAM layer to make thin")
    if opts.tmpfs_dir is not None and opts.mode is Mode.PERSISTENT:
        raise UsageError(f"{name['tmpfs_dir']} means nothing with a persistent overlay",
                         hint="its COW is the overlay file, not RAM")


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


# Copy to RAM (rd.live.ram).  dracut copies whatever the image's size and
# the machine's RAM: a copy that does not fit fills the RAM and the boot
# hangs.  Here the copy must fit beside the COW at its full size, and leave
# RAM_MARGIN for the rest of the boot (systemd, udev, the first services).
RAM_MARGIN = 256 * MiB
SMALLEST_COW = 64 * MiB  # a default COW squeezed below this is of no use


def mem_available(meminfo: str) -> int:
    """MemAvailable of /proc/meminfo: what can be taken without swapping
    (free memory and the page cache that can be dropped)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OverlayError("cannot read MemAvailable from /proc/meminfo",
                       hint="copying to RAM needs a kernel of 3.14 or later")


def ram_copy_cow(image: int, cow: int, available: int, *, cow_given: bool) -> int:
    """The COW's size beside a copy of the image (`image` bytes) in RAM,
    decided before the copy starts: a size given (`cow_given`) is kept or
    refused; the default (half the RAM) shrinks to what the copy leaves, down
    to SMALLEST_COW.  `cow` is 0 with a persistent overlay (its COW is on
    disk).  OverlayError in one line naming the sizes when they do not fit
    in `available` (MemAvailable) with RAM_MARGIN to spare."""
    room = available - RAM_MARGIN - image
    if cow and not cow_given:
        cow = max(min(cow, room), SMALLEST_COW)
    if cow <= room:
        return cow
    cow_part = f", {_mib(cow)} for the COW" if cow else ""
    hint = "leave out --ram (rd.live.ram): the image is then read from the medium, which stays in"
    if cow and cow_given:
        hint = "give a smaller --overlay-size (rd.live.overlay.size), or " + hint
    raise OverlayError(
        f"not enough RAM to copy the image: {_mib(image)} for it{cow_part} and "
        f"{_mib(RAM_MARGIN)} for the rest of the boot need {_mib(image + cow + RAM_MARGIN)}, "
        f"and {_mib(available, down=True)} is available", hint=hint)


def _mib(size: int, *, down: bool = False) -> str:
    """Whole MiB, as rd.live.overlay.size counts: what is needed rounded up,
    what is there rounded down, so that the two never read alike."""
    return f"{max(size, 0) // MiB if down else -(-size // MiB)} MiB"
