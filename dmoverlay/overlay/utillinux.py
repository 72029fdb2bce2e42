"""The util-linux backend of `blockdev`: loop devices and mounts through
losetup, mount and umount, and the backing file read from sysfs.

For where libblockdev's GObject binding is not installed: an initramfs
carries python3 and these three tools, not gi, its typelibs and plugins.
The operations take and give what the libblockdev ones do, fail with the
same kind of error (the tool's first line of stderr, cleaned), and import
nothing of gi; `blockdev` checks their arguments and guards a detach by its
backing file, for both backends.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dmoverlay.core.errors import BlockDevError
from dmoverlay.core.run import Result, find_tool, run

TOOLS = ("losetup", "mount", "umount")

# What the kernel names a loop device; anything else (a name read from a
# state file may be hostile) is no loop device and never becomes a sysfs path.
_LOOP_NAME = re.compile(r"loop[0-9]+")
_SYS_BLOCK = Path("/sys/block")

# A line of stderr goes into an error line: a file name in it may hold
# anything, and a tool may write a long story.
_DETAIL_LIMIT = 200


def missing_tools() -> list[str]:
    """The tools of TOOLS not found on the PATH commands run with."""
    return [tool for tool in TOOLS if find_tool(tool) is None]


def _root_hint() -> str | None:
    return None if os.geteuid() == 0 else "loop devices need root: run it with sudo"


def detail(result: Result, *names: str) -> str:
    """The first line a tool wrote on stderr, without the `tool: ` and
    `NAME: ` it starts with (our message names them already), made printable
    and short."""
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines()]
    line = next((line for line in lines if line), f"exit status {result.returncode}")
    for prefix in (os.path.basename(result.argv[0]), *names):
        line = line.removeprefix(f"{prefix}: ")
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= _DETAIL_LIMIT else line[:_DETAIL_LIMIT - 3] + "..."


def _failed(result: Result, message: str, *names: str,
            hint: str | None = None) -> BlockDevError:
    return BlockDevError(f"{message}: {detail(result, *names)}", hint=hint)


# ---------------------------------------------------------------- loop devices

def loop_setup(file: str, *, read_only: bool, offset: int, size: int, part_scan: bool) -> str:
    # --read-only makes losetup open the file O_RDONLY, so a file on
    # read-only media (inside a mounted squashfs) can be attached.
    argv = ["losetup", "--find", "--show"]
    argv += ["--read-only"] if read_only else []
    argv += ["--offset", str(offset)] if offset else []
    argv += ["--sizelimit", str(size)] if size else []
    argv += ["--partscan"] if part_scan else []
    # absolute, so that a name starting with "-" is never an option
    result = run([*argv, "--", os.path.abspath(file)], check=False)
    message = f"cannot attach {file} to a loop device"
    if result.returncode != 0:
        raise _failed(result, message, file, os.path.abspath(file), hint=_root_hint())
    dev = result.stdout.strip()
    name = dev.removeprefix("/dev/")
    if not _LOOP_NAME.fullmatch(name):
        raise BlockDevError(f"{message}: losetup printed {dev[:_DETAIL_LIMIT]!r}, "
                            f"not a loop device")
    _check_writable(name, read_only=read_only, message=message)
    return dev


def _check_writable(name: str, *, read_only: bool, message: str) -> None:
    """losetup quietly attaches read-only a file it cannot open for writing
    (read-only media); libblockdev refuses.  Refuse too: a caller that asked
    for a writable device (a COW store) must not get one that fails writes."""
    if read_only or _sys(name, "ro") != "1":
        return
    loop_detach(name)  # just attached and still bound: ours
    raise BlockDevError(f"{message}: the file cannot be opened for writing "
                        f"(read-only media?)", hint="attach it read-only, or copy it "
                        "to a writable place")


def _sys(name: str, attr: str) -> str | None:
    """A loop device's sysfs attribute; None when the device or the
    attribute is not there."""
    path = _SYS_BLOCK / name / attr
    try:
        return path.read_text(errors="surrogateescape").removesuffix("\n")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise BlockDevError(f"cannot read {path}: {exc.strerror}") from None


def loop_get_backing(name: str) -> str | None:
    """By sysfs: its loop/ directory exists only while a file is attached,
    and no program needs to start."""
    if not _LOOP_NAME.fullmatch(name):
        return None
    return _sys(name, "loop/backing_file") or None


def loop_detach(name: str) -> None:
    if not _LOOP_NAME.fullmatch(name):
        raise BlockDevError(f"cannot detach loop device {name[:_DETAIL_LIMIT]!r}: "
                            f"not a loop device name")
    dev = f"/dev/{name}"
    result = run(["losetup", "--detach", dev], check=False)
    if result.returncode != 0:
        raise _failed(result, f"cannot detach loop device {name}", dev, hint=_root_hint())


# ---------------------------------------------------------------- mounts

def mount(device: str, where: str, *, fstype: str, options: str) -> None:
    argv = ["mount", "-t", fstype, *(["-o", options] if options else []), "--", device, where]
    result = run(argv, check=False)
    if result.returncode != 0:
        raise _failed(result, f"cannot mount {device} ({fstype}) on {where}", where, device,
                      hint=_root_hint())


def unmount(where: str, *, lazy: bool) -> None:
    result = run(["umount", *(["--lazy"] if lazy else []), "--", where], check=False)
    if result.returncode != 0:
        raise _failed(result, f"cannot unmount {where}", where)
