"""The kernel command line's updates (rd.live.updates=, anaconda's
inst.updates=), applied onto the new root before switch_root, in the order
given, each all or nothing.

An update that cannot be had, checked or applied is left out and the next
one tried: a boot never stops for an update.  Each outcome says why, for
the console and the booted system's journal.

Where an update is:
  http://... or https://...   downloaded (under the live /run); more URLs
                              of the same file may follow, after commas:
                              mirrors, tried in turn when one fails
  DEVICE:/PATH                a file or directory on DEVICE (LABEL=, UUID=,
                              PARTUUID=, PARTLABEL=, CDLABEL=, /dev/...),
                              mounted read-only for as long as it is read
  /PATH                       on the live medium, as setup mounted it
Any of them may end in #sha256=HEX: the file must have that checksum.

Each update stays one word of the command line, and one URL alone is what
dracut and anaconda read: a URL's #fragment is no part of the request
(curl leaves it out too), so URL#sha256=HEX still downloads with tools
that take the URL alone (unchecked); mirrors are ours.
A comma splits URLs only where a new http(s):// begins.

Signed updates: an initramfs made with dracut.conf's
`dmoverlay_updates_keys=FILE` holds those keys at KEYS, and then every update
must be signed by one of them (core.signature), whatever the command line
says: a command line can be edited at the boot loader, the initramfs is
what the machine was given, so it cannot name other keys, nor other
revoked keys, than those the initramfs holds (all updates are then left
out).  Without them, `rd.live.updates.verify=PATH` (a file in the
initramfs) requires signatures by the keys in PATH; keys that cannot be
read leave every update out.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dmoverlay.apply.readers.checksum import parse_sha256
from dmoverlay.apply.readers.download import url_scheme
from dmoverlay.apply.update import DOWNLOAD_DEADLINE, ApplyOptions, Result, apply_update
from dmoverlay.core import log
from dmoverlay.core.errors import DmoverlayError, KeysError, NoOverlay, UsageError
from dmoverlay.core.signature import Trust, load_trust
from dmoverlay.overlay import blockdev, cmdline, devspec
from dmoverlay.overlay.media import fs_type
from dmoverlay.overlay.state import check_state_dir, load_state

# What an update's device may hold: the filesystems boot media have.
FILESYSTEMS = ("ext4", "ext3", "ext2", "iso9660", "vfat", "squashfs", "xfs", "btrfs", "udf")
# Read-only is not enough: ext3/4 and xfs replay a journal that needs it,
# writing to the device, and ext2/3/4 obey a superblock that asks an error
# to panic the kernel.  The options that read a device as it is.
_MOUNT_OPTIONS = "ro,nodev,nosuid,noexec"
_FS_OPTIONS = {"ext2": ",errors=remount-ro", "ext3": ",noload,errors=remount-ro",
               "ext4": ",noload,errors=remount-ro", "xfs": ",norecovery"}
# A boot waits for each update in turn (a download up to its deadline): past
# these, the rest of a long line is left out, not tried.
MAX_UPDATES = 16
# URLs of one update: a word that names more is a mistake, not a fleet
MAX_MIRRORS = 8
# a checksum at the end of an update's word, and the commas between its URLs
_CHECKSUM = re.compile(r"(?P<rest>.*)#sha256=(?P<hex>[^#]*)", re.DOTALL)
_NEXT_URL = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# Where the dracut module puts dmoverlay_updates_keys= and
# dmoverlay_updates_revoked= (module-setup.sh)
KEYS = Path("/etc/dmoverlay/updates.keys")
REVOKED = Path("/etc/dmoverlay/updates.revoked")
# user:password@ in a URL, as far as the last @ before the path
_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/\s]*@")


class Where(StrEnum):
    URL = "url"
    DEVICE = "device"
    MEDIUM = "medium"


@dataclass(frozen=True)
class Source:
    """An update's location, parsed from the command line's text."""

    text: str
    where: Where
    path: str  # the URL, or the path on the device or medium
    device: devspec.Location | None = None
    mirrors: tuple[str, ...] = ()  # more URLs of the same file
    sha256: str | None = None  # the checksum the file must have


def parse_source(text: str) -> Source:
    """UsageError when `text` names no place an update can come from."""
    place, sha256 = _checksum(text)
    if url_scheme(place) is not None:
        urls = _NEXT_URL.split(place)
        if len(urls) > MAX_MIRRORS:
            raise UsageError(f"{len(urls)} URLs for one update, more than {MAX_MIRRORS}",
                             hint="name fewer mirrors")
        for url in urls:
            _check_url(url)
        return Source(text, Where.URL, urls[0], mirrors=tuple(urls[1:]), sha256=sha256)
    source = _on_a_device(place)
    return Source(text, source.where, source.path, source.device, sha256=sha256)


def _checksum(text: str) -> tuple[str, str | None]:
    """(the place, the checksum) of an update's word: PLACE#sha256=HEX."""
    match = _CHECKSUM.fullmatch(text)
    if match is None:
        if "#sha256" in text.lower():  # not to be taken for a URL's fragment: unchecked
            raise UsageError("#sha256= not at the end of the word, or not as #sha256=HEX",
                             hint="end the word with #sha256=HEX (64 hexadecimal digits)")
        return text, None
    if "#sha256=" in match["rest"]:
        raise UsageError("#sha256= given twice", hint="give it once, at the end of the word")
    return match["rest"], parse_sha256(match["hex"])


def _check_url(url: str) -> None:
    scheme = url_scheme(url)
    if scheme not in ("http", "https"):
        raise UsageError(f"{scheme} URLs are not supported" if scheme else
                         f"not an http(s) URL: {url}", hint="give an http(s) URL")
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError as exc:  # "Invalid IPv6 URL": not to end the updates after it
        raise UsageError(f"not a valid URL ({exc})", hint="give an http(s) URL") from None
    if "@" in netloc:
        raise UsageError("a user or password in a URL is not supported",
                         hint="serve the update without one, or put it on a device")


def _on_a_device(text: str) -> Source:
    device, sep, path = text.partition(":/")
    if sep:
        spec = devspec.parse(device)
        if spec is not None or device.startswith("/dev/"):
            return Source(text, Where.DEVICE, "/" + path, devspec.Location(device, spec))
    if text.startswith("/"):
        return Source(text, Where.MEDIUM, text)
    raise UsageError("not an http(s) URL, DEVICE:/PATH or /PATH on the live medium")


def cmdline_updates(path: str) -> tuple[str, ...]:
    """The updates a command line names, in order (none for a command line
    that asks for no live boot: anaconda's inst.updates= is read all the
    same)."""
    return cmdline.updates_of(cmdline.read_cmdline(path))


def boot_trust(path: str, *, given: Trust | None = None, keys: Path = KEYS,
               revoked: Path = REVOKED) -> Trust | None:
    """The keys the updates of the command line in `path` must be signed by:
    `given` (apply --verify), else rd.live.updates.verify=, else those the
    initramfs holds at `keys` (then `revoked` too, if there); None when
    none is asked for.  A command line may name the keys (or the revoked
    ones) only where the initramfs holds none.  KeysError when they cannot
    be used: no update may then be applied."""
    if given is not None:
        return given
    named, named_revoked = cmdline.updates_trust_of(cmdline.read_cmdline(path))
    if os.path.lexists(keys):
        _only_the_initramfs(named, keys, "rd.live.updates.verify")
        if os.path.lexists(revoked):
            _only_the_initramfs(named_revoked, revoked, "rd.live.updates.revoked")
    elif named is None:
        if named_revoked is not None:
            raise UsageError("kernel command line: rd.live.updates.revoked= without keys to "
                             "verify with", hint="add rd.live.updates.verify=FILE")
        return None
    if named_revoked is None and os.path.lexists(revoked):
        named_revoked = os.fspath(revoked)
    return load_trust(Path(named) if named is not None else keys,
                      Path(named_revoked) if named_revoked is not None else None)


def _only_the_initramfs(named: str | None, baked: Path, key: str) -> None:
    """KeysError when the command line names another file than the one the
    initramfs holds: it would replace the initramfs's keys (by a file on the
    medium, or one an earlier boot left under the new root), or empty its
    revoked keys, and so undo what the initramfs asks for."""
    if named is not None and os.path.realpath(named) != os.path.realpath(baked):
        raise KeysError(f"kernel command line: {key}={shown(named)}: the initramfs holds "
                        f"{baked}, which the command line cannot replace",
                        hint=f"leave {key}= out: the initramfs's keys are used")


def where_setup_left(state_dir: Path, name: str) -> tuple[Path, str]:
    """(a private directory to mount devices in, the medium's mount point)
    from what setup recorded; the medium is "" when there is none.  The
    state directory is made when no setup made it (inst.updates= on a boot
    that is not live), but not its parents: those are the system's."""
    check_state_dir(state_dir)
    try:
        state_dir.mkdir(mode=0o700, exist_ok=True)
    except FileNotFoundError:
        raise UsageError(f"{state_dir.parent}: no such directory to keep {state_dir.name} in",
                         hint="give a --state-dir whose parent exists (setup's: /run)") from None
    check_state_dir(state_dir)
    try:
        state, _ = load_state(state_dir, name)
    except NoOverlay:
        return state_dir, ""  # updates on the medium are then refused, one by one
    except DmoverlayError as exc:  # a state file not to be trusted: said, not acted on
        log.warning(f"{exc.message}: no medium taken from it")
        return state_dir, ""
    if state.medium and state.medium == state.target:  # setup mounts it in its work dir
        log.warning(f"{state_dir}: the medium recorded is the root it updates: not taken")
        return state_dir, ""
    return state_dir, state.medium


def shown(text: str) -> str:
    """Text as the console and the journal may keep it: a password in a URL
    masked, control characters escaped."""
    masked = _PASSWORD.sub(r"\1:***@", text)
    return masked if masked.isprintable() else repr(masked)[1:-1]


@dataclass(frozen=True)
class Outcome:
    """What became of one update."""

    text: str
    applied: bool
    written: int = 0
    reason: str = ""  # why it was left out
    dry_run: bool = False  # applied: it would be; nothing was written

    def line(self) -> str:
        if self.applied and self.dry_run:
            return f"would apply {self.text} (dry run: nothing written)"
        if self.applied:
            return f"applied {self.text} ({self.written} entries)"
        return f"left out {self.text}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {"update": self.text, "applied": self.applied, "written": self.written,
                "reason": self.reason, "dry_run": self.dry_run}


def apply_all(updates: tuple[str, ...], options: ApplyOptions, *, mounts: Path,
              medium: str = "", deadline: float = DOWNLOAD_DEADLINE,
              trust: Trust | None = None) -> list[Outcome]:
    """Apply each update in turn; never raises for one that fails (an
    interruption, such as SIGTERM turned into an exception, does go through,
    after the update under way is undone).

    `mounts`: a private directory (setup's state directory) to mount a
    device on while it is read; `medium`: where setup mounted the medium;
    `deadline`: seconds the downloads may take in all (a boot waits for
    them in turn), those left when an update starts are its own; `trust`:
    the keys each update must be signed by (boot_trust)."""
    outcomes: list[Outcome] = []
    end = time.monotonic() + deadline
    for text in dict.fromkeys(updates):  # one given twice is applied once
        left = end - time.monotonic()
        if len(outcomes) >= MAX_UPDATES or left <= 0:
            why = (f"past the first {MAX_UPDATES} updates" if len(outcomes) >= MAX_UPDATES
                   else f"the updates' {deadline:g} s are up")
            outcomes.append(Outcome(shown(text), False, reason=f"not tried: {why}"))
            continue
        outcomes.append(_apply_one(text, options, mounts, medium, left, trust))
    return outcomes


def _apply_one(text: str, options: ApplyOptions, mounts: Path, medium: str,
               deadline: float, trust: Trust | None) -> Outcome:
    result: Result | None = None
    why = ""
    try:
        with log.step(f"applying the update {shown(text)}"):
            source = parse_source(text)
            with _located(source, mounts, medium) as spec:
                result = apply_update(spec, options, sha256=source.sha256,
                                      mirrors=source.mirrors, trust=trust,
                                      deadline=deadline)
    except DmoverlayError as exc:
        why = shown(exc.message)
    except OSError as exc:  # the device or medium went away under us
        why = shown(exc.strerror or str(exc))
    if result is None:
        return Outcome(shown(text), False, reason=why)
    if why:  # the root has it: only letting its device go failed
        log.warning(f"{shown(text)}: applied, but {why}")
    return Outcome(shown(text), True, written=result.written, dry_run=result.dry_run)


@contextmanager
def _located(source: Source, mounts: Path, medium: str) -> Iterator[str]:
    """What apply_update is given for a source: the URL, or a path that
    lies on the device or medium named (judged where it resolves)."""
    if source.where is Where.URL:
        yield source.path
        return
    with ExitStack() as stack:
        if source.where is Where.MEDIUM:
            if not medium or not os.path.ismount(medium):
                raise UsageError("no live medium is mounted to find it on (the root is an "
                                 "image file, or the medium was released)")
            top = medium
        else:
            assert source.device is not None
            top = stack.enter_context(_mounted(source.device, mounts))
        yield _inside(top, source.path)


def _inside(top: str, path: str) -> str:
    """top/path, resolved: UsageError if a link on the way leads off `top`
    (`top` resolved too: it may be named through a link, /var/run)."""
    top = os.path.realpath(top)
    resolved = os.path.realpath(os.path.join(top, path.lstrip("/")))
    if os.path.commonpath([resolved, top]) != top:
        raise UsageError(f"{path} leads off the device it is on (a link to {resolved})")
    if not os.path.exists(resolved):
        raise UsageError(f"{path}: no such file on it")
    return resolved


@contextmanager
def _mounted(device: devspec.Location, mounts: Path) -> Iterator[str]:
    """The device mounted read-only in `mounts`, while it is read."""
    dev = devspec.find(device)
    try:
        st = os.stat(dev)
    except OSError:
        raise UsageError(f"{dev}: no such device") from None
    if not stat.S_ISBLK(st.st_mode):  # mount would set up a loop device on a file
        raise UsageError(f"{dev}: not a block device")
    fstype = fs_type(dev)
    if fstype not in FILESYSTEMS:
        raise UsageError(f"{dev}: holds {fstype or 'no filesystem known here'}, not one of "
                         f"{', '.join(FILESYSTEMS)}")
    where = tempfile.mkdtemp(prefix="updates-", dir=os.fspath(mounts))
    try:
        with blockdev.mounted(dev, where, fstype=fstype,
                              options=_MOUNT_OPTIONS + _FS_OPTIONS.get(fstype, "")):
            yield where
    finally:
        os.rmdir(where)
