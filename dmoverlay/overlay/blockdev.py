"""Loop devices and mounts, the way setup and teardown ask for them, through
one of two backends chosen once per process:

- `libblockdev` (gi.repository.BlockDev), where its binding and the plugins
  dmoverlay uses load: what a booted system has;
- `utillinux` (losetup, mount, umount), otherwise: what an initramfs has,
  which carries python3 and these tools but not gi and its typelibs.

DMOVERLAY_BLOCKDEV=libblockdev or =util-linux forces one (empty: not set).
The choice is quiet (DMOVERLAY_DEBUG shows it); the util-linux path never
imports gi or ctypes.  What both share is here, once: the argument checks,
loop device names, and the guard that detaches a loop device only while it
still holds the file it was attached to.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from dmoverlay.core import run
from dmoverlay.core.errors import BlockDevError, UsageError, install_hint
from dmoverlay.overlay import utillinux

ENV = "DMOVERLAY_BLOCKDEV"
LIBBLOCKDEV = "libblockdev"
UTIL_LINUX = "util-linux"
BACKENDS = (LIBBLOCKDEV, UTIL_LINUX)


# typing only for the type checker: its import is ms of the boot's start-up (boot.hooks)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Backend(Protocol):
        """What a backend module provides: the file as given (a path), loop
        devices by bare name (loop0), arguments already checked."""

        def loop_setup(self, file: str, *, read_only: bool, offset: int, size: int,
                       part_scan: bool) -> str: ...

        def loop_get_backing(self, name: str) -> str | None: ...

        def loop_detach(self, name: str) -> None: ...

        def mount(self, device: str, where: str, *, fstype: str, options: str) -> None: ...

        def unmount(self, where: str, *, lazy: bool) -> None: ...


@dataclass(frozen=True)
class Choice:
    """The backend a process would use, and why."""

    name: str
    why: str


def forced() -> str | None:
    """The backend DMOVERLAY_BLOCKDEV names, None when it is not set."""
    value = os.environ.get(ENV, "")
    if not value:
        return None
    if value not in BACKENDS:
        raise UsageError(f"{ENV}={value[:40]!r} is not a backend: use "
                         f"{' or '.join(BACKENDS)}",
                         hint=f"unset {ENV} to let dmoverlay choose")
    return value


def libblockdev_problem() -> BlockDevError | None:
    """Why libblockdev cannot be used here, or None when it can."""
    try:
        # ctypes too may be missing where gi is (a pruned initramfs)
        from dmoverlay.overlay import libblockdev
    except ImportError as exc:
        return BlockDevError(f"libblockdev cannot be used: {exc}")
    return libblockdev.problem()


def choose() -> Choice:
    """Which backend this process would use; it does not check that the
    forced one, or util-linux's tools, are there (backend() does)."""
    name = forced()
    if name is not None:
        return Choice(name, f"set by {ENV}")
    problem = libblockdev_problem()
    if problem is None:
        return Choice(LIBBLOCKDEV, "its binding and plugins load")
    return Choice(UTIL_LINUX, problem.message)


@cache
def backend() -> Backend:
    """The chosen backend, ready to use; decided once per process (a failure
    is not remembered: it is raised again on the next call)."""
    choice = choose()
    if run.debug:
        print(f"# loop devices and mounts through {choice.name}: {choice.why}",
              file=sys.stderr)
    if choice.name == LIBBLOCKDEV:
        from dmoverlay.overlay import libblockdev

        problem = libblockdev.problem()  # forced: say why it cannot be used
        if problem is not None:
            raise problem
        return libblockdev
    _require_utillinux(choice)
    return utillinux


def _require_utillinux(choice: Choice) -> None:
    missing = utillinux.missing_tools()
    if not missing:
        return
    why = "" if choice.why.startswith("set by") else f" ({choice.why})"
    raise BlockDevError(f"{', '.join(missing)} not found: no way to attach loop devices and "
                        f"mount without libblockdev{why}",
                        hint=install_hint(missing))


def backend_name() -> str:
    """"libblockdev" or "util-linux": what this process uses."""
    return LIBBLOCKDEV if backend() is not utillinux else UTIL_LINUX


# Loop devices.  Names: callers may pass "loop0" or "/dev/loop0"; we return
# the path, which is what mount, dmsetup and the kernel's tables take.

def _loop_name(dev: str | os.PathLike[str]) -> str:
    name = os.fspath(dev)
    return name.removeprefix("/dev/")


def loop_setup(path: str | os.PathLike[str], *, read_only: bool, offset: int = 0,
               size: int = 0, part_scan: bool = False) -> str:
    """Attach a file to a free loop device; returns its path (/dev/loopN).

    size 0 means up to the end of the file.  read_only opens the file
    read-only, so it may sit on read-only media."""
    if offset < 0 or size < 0:
        raise UsageError(f"loop offset and size must not be negative (got {offset}, {size})")
    return backend().loop_setup(os.fspath(path), read_only=read_only, offset=offset,
                                size=size, part_scan=part_scan)


def loop_get_backing(dev: str | os.PathLike[str]) -> str | None:
    """The file attached to a loop device, or None when nothing is attached
    (or there is no such device)."""
    return backend().loop_get_backing(_loop_name(dev))


def loop_teardown(dev: str | os.PathLike[str], *,
                  backing: str | os.PathLike[str] | None = None) -> None:
    """Detach a loop device.

    With backing: detach only while the device still holds that file, and
    otherwise do nothing, so cleanup may run twice.  Going by the name alone
    would not be safe: a freed loop device is soon reused by someone else."""
    name = _loop_name(dev)
    chosen = backend()
    if backing is not None and not _same_file(chosen.loop_get_backing(name), backing):
        return
    chosen.loop_detach(name)


def _same_file(attached: str | None, path: str | os.PathLike[str]) -> bool:
    if attached is None:
        return False
    try:
        return os.path.samefile(attached, path)
    except OSError:
        # The kernel's path may not resolve here (deleted, or another mount
        # namespace): fall back to comparing names.
        return attached == os.path.realpath(path)


# Mounts: both backends mount through libmount (mount(8) is built on it).

def mount(device: str | os.PathLike[str], where: str | os.PathLike[str], *, fstype: str,
          options: str = "") -> None:
    backend().mount(os.fspath(device), os.fspath(where), fstype=fstype, options=options)


def unmount(where: str | os.PathLike[str], *, lazy: bool = False) -> None:
    backend().unmount(os.fspath(where), lazy=lazy)


@contextmanager
def mounted(device: str | os.PathLike[str], where: str | os.PathLike[str], *, fstype: str,
            options: str = "") -> Iterator[None]:
    """`device` mounted on `where` for as long as the block runs, unmounted
    (lazily: a reader may still hold a file) on every way out, whether mount
    returned or not: an interruption may come once the mount is made."""
    try:
        mount(device, where, fstype=fstype, options=options)
        yield
    finally:
        if os.path.ismount(where):
            unmount(where, lazy=True)
