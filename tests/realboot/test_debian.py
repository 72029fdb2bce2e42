"""A real Debian 12 root (systemd, udev) from Debian's repository, built by
`dmoverlay build` as a normal user, boots through the module to multi-user
with no failed unit; an update that cannot be had is left out, and the
booted system's journal says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def test_a_debian_root_boots_to_multi_user_with_no_failed_unit(
        kit: dict[str, Path | str], nobodys_dir: Path) -> None:
    tarball = nobodys_dir / "root.tar"  # the cache is root's: a copy the user can read
    shutil.copyfile(debian.root_tarball(), tarball)
    built = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "dmoverlay", "-q", "build", str(tarball),
         "-o", str(nobodys_dir / "squashfs.img"), "--disk", str(nobodys_dir / "disk.img"),
         "--compression", "zstd", "--free", "256M"],
        capture_output=True, text=True, check=False, timeout=1200,
        env={**os.environ, "PYTHONPATH": str(machine.TOP), "HOME": str(nobodys_dir)})
    assert built.returncode == 0, built.stderr
    log = nobodys_dir / "console.log"
    result = machine.boot(Path(kit["kernel"]), Path(kit["initrd"]),
                          "root=live:LABEL=LIVE rd.live.overlay.size=256 systemd.show_status=0 "
                          "rd.live.updates=/not-on-the-medium.img",
                          [nobodys_dir / "disk.img"], log=log, timeout=600, snapshot=True)
    assert result.ended, "the boot did not end:\n" + result.console[-4000:]
    assert result.probe, "the probe never ran:\n" + result.console[-4000:]
    assert result.root_mount[:2] == ["/dev/mapper/live-rw", "ext4"], result.probe
    assert result.has("failed ") == []
    assert result.has("state ") == ["state running"], result.probe
    # the update that was not there: left out, the boot went on, and the
    # booted system's journal says why
    said = [line for line in result.has("journal ") if "left out /not-on-the-medium.img" in line]
    assert said, result.probe
