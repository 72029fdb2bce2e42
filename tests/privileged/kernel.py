"""Loop devices, tmpfs, device-mapper tables and mounts for the privileged tests.

Independent of dmoverlay's own code, so that they prove the harness and the kernel,
but for one piece: `dmsetup status` is read with dmoverlay.core.cow.parse_status, which
these tests thereby check against what a real kernel prints.  Each attach has
its detach in a finally block; a teardown that fails raises (it is never swallowed),
and every command has a time limit, so a wedged device fails a test instead of
stalling the VM until the harness kills it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from dmoverlay.core.cow import SnapshotStatus, parse_status

MiB = 1024 * 1024
SECTOR = 512

# Under software emulation a mkfs or mksquashfs takes seconds; a minute means a hang.
COMMAND_TIMEOUT = 120.0


class CommandError(Exception):
    pass


def run(*argv: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Runs a command with stdin closed and the C locale; returns its stdout."""
    args = [os.fspath(a) for a in argv]
    env = {**os.environ, "LC_ALL": "C"}
    try:
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CommandError(f"{shlex.join(args)}: no answer after {timeout:.0f} s") from None
    if result.returncode != 0:
        raise CommandError(
            f"{shlex.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def sparse_file(path: Path, size: int) -> Path:
    """A file with no blocks, as dracut makes its COW (`dd seek=`)."""
    with path.open("xb") as f:
        f.truncate(size)
    return path


def make_ext4(path: Path, *, size: int, tree: Path) -> Path:
    sparse_file(path, size)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-L", "dmoverlay-test",
        "-E", "root_owner=0:0", "-d", tree, path)
    return path


def device_sectors(device: Path) -> int:
    return int(Path("/sys/class/block", device.resolve().name, "size").read_text())


def wait_for_block_device(node: Path, *, timeout: float = 10.0) -> None:
    """Device nodes come from libdevmapper itself when no udev runs (the VM), or from
    udev a moment later (a real host)."""
    deadline = time.monotonic() + timeout
    while not (node.exists() and node.is_block_device()):
        if time.monotonic() > deadline:
            raise CommandError(f"{node} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


@contextlib.contextmanager
def loop_device(backing: Path, *, read_only: bool) -> Iterator[Path]:
    ro = ["--read-only"] if read_only else []
    device = Path(run("losetup", "--find", "--show", *ro, backing).strip())
    try:
        sysfs = Path("/sys/class/block", device.name)
        wait_for_block_device(device)
        # Confirm the device really is this file's, read-only as asked.
        attached = (sysfs / "loop" / "backing_file").read_text().strip()
        if not os.path.samefile(attached, backing):
            raise CommandError(f"{device} points at {attached}, not {backing}")
        if (sysfs / "ro").read_text().strip() != ("1" if read_only else "0"):
            raise CommandError(f"{device}: read-only is not {read_only}")
        yield device
    finally:
        run("losetup", "--detach", device)


def unmount(path: Path, *, attempts: int = 10) -> None:
    """Retries a busy unmount: something may still hold a file open for a moment."""
    for attempt in range(attempts):
        try:
            run("umount", path)
            return
        except CommandError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def mounted(source: Path | str, target: Path, *options: str,
            fstype: str | None = None) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    argv: list[str | os.PathLike[str]] = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    run(*argv, source, target)
    try:
        yield target
    finally:
        unmount(target)


def tmpfs(target: Path, *, size: int) -> contextlib.AbstractContextManager[Path]:
    return mounted("dmoverlay-test", target, f"size={size}", "mode=0700", fstype="tmpfs")


@contextlib.contextmanager
def dm_device(name: str, table: str) -> Iterator[Path]:
    run("dmsetup", "create", name, "--table", table)
    try:
        node = Path("/dev/mapper", name)
        wait_for_block_device(node)
        yield node
    finally:
        run("dmsetup", "remove", "--retry", name)


def snapshot_status(name: str) -> SnapshotStatus:
    """The snapshot's state and COW use, in sectors."""
    return parse_status(run("dmsetup", "status", name))


def dm_name(what: str) -> str:
    """A device-mapper name no real system uses: --host runs on real machines."""
    return f"dmoverlay-test-{os.getpid()}-{what}"

