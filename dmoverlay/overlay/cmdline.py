"""The kernel command line as dracut's dmsquash-live users write it, read into
what `setup` and the boot's `apply` need.  Pure: text in, values out.

Every key dmoverlay reads is one row of KEYS, with dracut's old spelling
beside it where dracut still reads one (`live_dir`, `overlay`...).  Keys of
the `rd.live.` family that are not rows are refused by name: a misspelt
`rd.live.overlay.sise=` would otherwise boot a machine with the wrong COW.
A key given twice takes its last value, as dracut's getarg does; updates
(`rd.live.updates=`, anaconda's `inst.updates=`) may be given several times
and are all kept, in order.

Defaults are dracut's (LiveOS, squashfs.img), but for one: without
`rd.live.overlay.size=`, dracut makes a 32 GiB sparse COW in RAM, which
promises writes no small machine can hold; dmoverlay's default, half the
RAM, is used instead.  A size given is honoured, in MiB as dracut reads it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from dmoverlay.core.errors import NotLive, UsageError
from dmoverlay.core.sizes import KiB, MiB
from dmoverlay.overlay import devspec, persistent
from dmoverlay.overlay.options import FLAGS, SetupOptions, check_options, inner_name

# typing only for the type checker: its import is ms of the boot's start-up (boot.hooks)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CMDLINE = "/proc/cmdline"
CMDLINE_MAX = 64 * KiB  # the kernel keeps a few KiB (x86: 2048 bytes); a file is input
FAMILY = ("rd.live.",)  # keys of this family must be known
_TRUE = frozenset({"", "1", "y", "yes", "on", "true"})  # "" is the bare key
_FALSE = frozenset({"0", "n", "no", "off", "false"})
# What separates words: ASCII blanks only, as dracut's shell and systemd read
# /proc/cmdline (Python's isspace() would also cut at U+00A0 or \x1c, inside a
# LABEL= that holds one)
_BLANKS = frozenset(" \t\n\v\f\r")
_MIB_DIGITS = 9  # up to 953 TiB: a longer number is no size (and int() has limits)
_DEVICE_KEYS = ("LABEL=", "UUID=", "PARTUUID=", "PARTLABEL=", "CDLABEL=")
_HINT = "see dracut.cmdline(7), section dmsquash-live, and dmoverlay's README"


class Value(Enum):
    FLAG = "flag"  # bare key, or =0/1/yes/no/on/off
    TEXT = "text"
    NAME = "name"  # a relative path inside the medium, no ".."
    MIB = "MiB"  # a whole number of MiB, as dracut reads sizes
    LIST = "list"  # may be given several times: every value kept


@dataclass(frozen=True)
class Key:
    name: str
    field: str  # of LiveBoot
    value: Value
    legacy: tuple[str, ...] = ()  # dracut's older spellings, still read


KEYS: tuple[Key, ...] = (
    Key("root", "root", Value.TEXT),
    Key("rd.live.image", "image_flag", Value.FLAG, ("liveimg",)),
    Key("rd.live.dir", "live_dir", Value.NAME, ("live_dir",)),
    Key("rd.live.squashimg", "squashfs_name", Value.NAME),
    Key("rd.live.ram", "ram", Value.FLAG, ("live_ram",)),
    Key("rd.live.overlay", "overlay", Value.TEXT, ("overlay",)),
    Key("rd.live.overlay.size", "overlay_size", Value.MIB),
    Key("rd.live.overlay.readonly", "overlay_readonly", Value.FLAG, ("readonly_overlay",)),
    Key("rd.live.overlay.reset", "overlay_reset", Value.FLAG, ("reset_overlay",)),
    Key("rd.live.overlay.thin", "overlay_thin", Value.FLAG),
    Key("rd.live.updates", "updates", Value.LIST),
    Key("inst.updates", "updates", Value.LIST),
    Key("rd.live.updates.verify", "updates_keys", Value.TEXT),
    Key("rd.live.updates.revoked", "updates_revoked", Value.TEXT),
    Key("rd.live.debug", "debug", Value.FLAG, ("rdlivedebug",)),
)
# dracut keys of the family whose feature dmoverlay does not have: booting
# without it would not be what the user asked for.
UNSUPPORTED: Mapping[str, str] = {
    "rd.live.overlay.overlayfs": "dmoverlay lays a device-mapper snapshot, not overlayfs",
    "rd.live.overlay.cowfs": "it chooses overlayfs' upper filesystem; dmoverlay has none",
    "rd.live.check": "checking the medium (checkisomd5) is not done by dmoverlay",
    "rd.writable.fsimg": "dmoverlay never unpacks the image to make it writable",
}
_BY_NAME = {name: key for key in KEYS for name in (key.name, *key.legacy)}


@dataclass(frozen=True)
class LiveBoot:
    """What a command line asks of a live boot."""

    root: str = ""  # the medium: a device spec, /dev node or image file, without "live:"
    image_flag: bool = False
    live_dir: str = "LiveOS"
    squashfs_name: str = "squashfs.img"
    ram: bool = False
    overlay: str | None = None  # persistent overlay: DEVICE:PATH, DEVICE or FILE
    overlay_size: int | None = None  # bytes; None: dmoverlay's default
    overlay_readonly: bool = False
    overlay_reset: bool = False
    overlay_thin: bool = False
    updates: tuple[str, ...] = ()
    updates_keys: str | None = None  # in the initramfs: the keys updates must be signed by
    updates_revoked: str | None = None
    debug: bool = False
    given: tuple[str, ...] = field(default=(), compare=False)  # keys seen, for messages


def split_cmdline(text: str) -> Iterator[tuple[str, str | None]]:
    """(key, value) pairs as the kernel splits them: by blanks, a double
    quote groups (and is dropped), everything after a bare "--" is init's.
    A key without "=" has the value None."""
    for word in _words(text):
        if word == "--":
            return
        key, eq, value = word.partition("=")
        yield key, value if eq else None


def _words(text: str) -> Iterator[str]:
    word: list[str] = []
    quoted = started = False
    for char in text:
        if char == '"':
            quoted, started = not quoted, True
        elif char in _BLANKS and not quoted:
            if started:
                yield "".join(word)
            word, started = [], False
        else:
            word.append(char)
            started = True
    if quoted:
        raise UsageError("kernel command line: a double quote is not closed", hint=_HINT)
    if started:
        yield "".join(word)


def parse(text: str) -> LiveBoot:
    """The live boot a command line asks for; UsageError naming the option
    for an unknown `rd.live.` key or a bad value; NotLive when it asks for
    no live boot.  Contradictions are setup's rules: setup_options."""
    values: dict[str, Any] = {}
    updates: list[str] = []
    given: list[str] = []
    for name, raw in split_cmdline(text):
        key = _known(name)
        if key is None:
            continue
        given.append(name)
        value = _value(key, name, raw)
        if key.value is Value.LIST:
            updates.append(str(value))
        else:
            values[key.field] = value
    boot = replace(LiveBoot(), **values, updates=tuple(updates), given=tuple(given))
    return _checked(_live_root(boot))


def updates_of(text: str) -> tuple[str, ...]:
    """The updates a command line names, in order; the rest of it is setup's
    to judge, and anaconda's inst.updates= needs no live root."""
    return tuple(str(_value(key, name, raw)) for name, raw in split_cmdline(text)
                 if (key := _BY_NAME.get(name)) is not None and key.value is Value.LIST)


def updates_trust_of(text: str) -> tuple[str | None, str | None]:
    """(keys, revoked): the files in the initramfs that the updates must be
    signed by a key of, and keys not to trust (None: not given); each an
    absolute path."""
    found: dict[str, str] = {}
    for name, raw in split_cmdline(text):
        key = _BY_NAME.get(name)
        if key is not None and key.field in ("updates_keys", "updates_revoked"):
            value = str(_value(key, name, raw))
            if not value.startswith("/"):
                raise UsageError(f"kernel command line: {name}={_shown(value)}: not an "
                                 "absolute path", hint="name a file in the initramfs, e.g. "
                                 f"{name}=/etc/dmoverlay/updates.keys")
            found[key.field] = value
    return found.get("updates_keys"), found.get("updates_revoked")


def _known(name: str) -> Key | None:
    key = _BY_NAME.get(name)
    if key is not None:
        return key
    if name in UNSUPPORTED:
        raise UsageError(f"kernel command line: {name} is not supported: {UNSUPPORTED[name]}",
                         hint=f"remove {name}, or boot with dracut's dmsquash-live")
    if name.startswith(FAMILY):
        raise UsageError(f"kernel command line: unknown option {_shown(name)}",
                         hint=f"known: {', '.join(k.name for k in KEYS if k.name != 'root')}")
    return None


def _value(key: Key, name: str, raw: str | None) -> Any:
    if key.value is Value.FLAG:
        return _flag(name, raw)
    if raw is None or raw == "":
        raise UsageError(f"kernel command line: {name} needs a value ({name}=...)", hint=_HINT)
    if "\0" in raw:
        raise UsageError(f"kernel command line: {name}: a NUL in its value", hint=_HINT)
    if key.value is Value.MIB:
        return _mib(name, raw)
    if key.value is Value.NAME:
        return _inner_name(name, raw)
    return raw


def _shown(raw: str) -> str:
    """A value as an error line may show it: one line, whatever it holds."""
    return raw if raw.isprintable() else repr(raw)[1:-1]


def _flag(name: str, raw: str | None) -> bool:
    word = "" if raw is None else raw.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise UsageError(f"kernel command line: {name}={_shown(word)}: not a yes or no",
                     hint=f"write {name} alone (yes), or {name}=0 (no)")


def _mib(name: str, raw: str) -> int:
    if (not raw.isascii() or not raw.isdigit() or len(raw.lstrip("0")) > _MIB_DIGITS
            or int(raw) == 0):
        raise UsageError(f"kernel command line: {name}={_shown(raw)}: not a whole number of MiB",
                         hint=f"e.g. {name}=4096 for 4 GiB, as dracut reads it")
    return int(raw) * MiB


def _inner_name(name: str, raw: str) -> str:
    try:
        return inner_name(raw, option=name)
    except UsageError as exc:
        raise UsageError(f"kernel command line: {name}={_shown(raw)}: {exc.message}",
                         hint=exc.hint) from None


def _live_root(boot: LiveBoot) -> LiveBoot:
    """root=live:X, or root=X with rd.live.image (dracut's older way)."""
    root = boot.root
    if root.startswith("live:"):
        return replace(boot, root=root.removeprefix("live:"))
    if boot.image_flag and root:
        return boot
    raise NotLive("kernel command line: no live root (root=live:...)",
                  hint="e.g. root=live:CDLABEL=Fedora-WS-Live or root=live:LABEL=LIVE")


def _checked(boot: LiveBoot) -> LiveBoot:
    root = boot.root
    if not root:
        raise UsageError("kernel command line: root=live: names no device", hint=_HINT)
    if root.startswith("nfs") or "://" in root:
        raise UsageError(f"kernel command line: root=live:{_shown(root)}: a network root is not "
                         "supported", hint="put the image on a local device or in the initramfs")
    if "=" in root and not root.startswith(_DEVICE_KEYS):
        raise UsageError(f"kernel command line: root=live:{_shown(root)}: not a device",
                         hint="LABEL=, UUID=, PARTUUID=, PARTLABEL=, CDLABEL=, /dev/... or "
                              "an image file")
    if not ("=" in root or root.startswith("/")):
        raise UsageError(f"kernel command line: root=live:{_shown(root)}: not a device",
                         hint="a device node or image file is an absolute path")
    return boot


def _name_of(field_name: str, boot: LiveBoot) -> str:
    """The spelling the user gave for a field (the last one given)."""
    for name in reversed(boot.given):
        if _BY_NAME[name].field == field_name:
            return name
    return next(k.name for k in KEYS if k.field == field_name)


def read_cmdline(path: str | os.PathLike[str] = CMDLINE) -> str:
    """A command line from /proc/cmdline or a file standing for it, read
    without blocking on a fifo and capped in size; UsageError if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read(CMDLINE_MAX + 1)
    except OSError as exc:
        raise UsageError(f"{os.fsdecode(path)}: cannot read the command line ({exc.strerror})",
                         hint=f"give a file holding one, or leave it out for {CMDLINE}") from None
    if len(data) > CMDLINE_MAX:
        raise UsageError(f"{os.fsdecode(path)}: over {CMDLINE_MAX} bytes: not a command line",
                         hint="a kernel command line is a few KiB at most")
    return data.decode(errors="surrogateescape")


def setup_options(boot: LiveBoot, *, target: Path, name: str, state_dir: Path,
                  tmpfs_dir: Path | None = None) -> SetupOptions:
    """What setup is asked to do by a command line, its texts parsed (once)
    and named as the command line names them when they are bad."""
    try:
        image = devspec.location(boot.root)
    except UsageError as exc:
        raise UsageError(f"kernel command line: root=live:{_shown(boot.root)}: {exc.message}",
                         hint=exc.hint) from None
    overlay = None
    if boot.overlay is not None:
        overlay = persistent.parse_spec(boot.overlay,
                                        option="kernel command line: rd.live.overlay")
    opts = SetupOptions(
        image=image, target=target, name=name, overlay_size=boot.overlay_size,
        live_dir=boot.live_dir, squashfs_name=boot.squashfs_name, tmpfs_dir=tmpfs_dir,
        state_dir=state_dir, overlay=overlay, overlay_reset=boot.overlay_reset,
        overlay_readonly=boot.overlay_readonly, overlay_thin=boot.overlay_thin, ram=boot.ram)
    named = {k.field: _name_of(k.field, boot) for k in KEYS if k.field in FLAGS}
    try:
        check_options(opts, named=named)
    except UsageError as exc:
        raise UsageError(f"kernel command line: {exc.message}", hint=exc.hint) from None
    return opts
