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
    "overlay_thin": "--overlay-thin", "tmpfs_dir": "--tmpfs-dir",
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
