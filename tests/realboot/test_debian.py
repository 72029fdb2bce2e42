"""A real Debian 12 root (systemd, udev) from Debian's repository, built by
`dmoverlay build` as a normal user, boots through the module to multi-user
with no failed unit; an update that cannot be had is left out, and the
booted system's journal says why.  Its changes go to a persistent overlay
on the medium; shutting down (systemctl poweroff: dracut's shutdown, in the
initramfs the booted system unpacks) leaves the medium cleanly unmounted,
and the next boot sees the changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realboot import debian, machine

NOBODY = 65534


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dmoverlay-debian-", dir="/var/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_debian_root_boots_keeps_its_changes_and_shuts_down_cleanly(
        kit: dict[str, Path | str], shutdown_initrd: Path, nobodys_dir: Path,
        tmp_path: Path) -> None:
    kver = str(kit["kver"])
    tarball = nobodys_dir / "root.tar"  # the cache is root's: a copy the user can read
    shutil.copyfile(debian.root_tarball(), tarball)
    # where dracut-initramfs-restore looks for it, as an installed kernel has it
    _add_file(tarball, f"boot/initrd.img-{kver}", shutdown_initrd)
    tarball.chmod(0o644)
    built = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "dmoverlay", "-q", "build", str(tarball),
         "-o", str(nobodys_dir / "squashfs.img"), "--disk", str(nobodys_dir / "disk.img"),
         "--compression", "zstd", "--free", "256M"],
        capture_output=True, text=True, check=False, timeout=1200,
        env={**os.environ, "PYTHONPATH": str(machine.TOP), "HOME": str(nobodys_dir)})
    assert built.returncode == 0, built.stderr
    disk = nobodys_dir / "disk.img"
    # the overlay: a file on a second disk's ext4, made by the first boot
    store = nobodys_dir / "store.img"
    with store.open("wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-L", "STORE", str(store)], check=True)
    cmdline = ("root=live:LABEL=LIVE rd.live.overlay=LABEL=STORE:/live.overlay "
               "rd.live.overlay.size=128 systemd.show_status=0 "
               "rd.live.updates=/not-on-the-medium.img")
    first = _boot(kit, shutdown_initrd, cmdline, [disk, store], tmp_path / "first.log")
    assert result_of(first) == 1
    # the update that was not there: left out, the boot went on, and the
    # booted system's journal says why
    said = [line for line in first.has("journal ") if "left out /not-on-the-medium.img" in line]
    assert said, first.probe
    # the shutdown hook tore the root down, and the disk holding the overlay
    # was unmounted: not left for the next boot to recover
    assert "dmoverlay: live: torn down" in first.console, first.console[-4000:]
    assert _fs_state(store) == ("clean", False)
    again = _boot(kit, shutdown_initrd, cmdline, [disk, store], tmp_path / "again.log")
    assert result_of(again) == 2  # the first boot's change kept


def _boot(kit: dict[str, Path | str], initrd: Path, cmdline: str, disks: list[Path],
          log: Path) -> machine.Boot:
    result = machine.boot(Path(kit["kernel"]), initrd, cmdline, disks, log=log, timeout=600)
    said = "\n".join(line for line in result.console.splitlines()
                     if "dmoverlay" in line or "rror" in line)
    assert result.ended, "the boot did not end:\n" + said
    assert result.probe, "the probe never ran:\n" + said
    return result


def result_of(boot: machine.Boot) -> int:
    """The boots the root's /var has seen, after checking this one came up
    whole on dmoverlay's live-rw."""
    assert boot.root_mount[:2] == ["/dev/mapper/live-rw", "ext4"], boot.probe
    assert boot.has("failed ") == []
    assert boot.has("state ") == ["state running"], boot.probe
    return int(boot.has("boots ")[0].split()[1])


def _add_file(tarball: Path, name: str, source: Path) -> None:
    with tarfile.open(tarball, "a", format=tarfile.GNU_FORMAT) as tar:
        info = tar.gettarinfo(str(source), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o600
        with source.open("rb") as f:
            tar.addfile(info, f)


def _fs_state(image: Path) -> tuple[str, bool]:
    """An ext4 image's state, and whether its journal needs recovery, as
    dumpe2fs reads them."""
    head = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True,
                          text=True).stdout
    fields = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
    return fields["Filesystem state"].strip(), "needs_recovery" in fields["Filesystem features"]
