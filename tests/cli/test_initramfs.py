"""`dmoverlay initramfs install` and `stage` at the command line: what is in
the way, or missing, is one error line and a hint, with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _dmoverlay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmoverlay", "initramfs", *args],
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("in_the_way", ["link", "directory"])
def test_install_over_something_in_the_way_is_one_error(tmp_path: Path, in_the_way: str) -> None:
    moddir, confdir, elsewhere = tmp_path / "modules.d", tmp_path / "conf.d", tmp_path / "else"
    for d in (moddir, confdir, elsewhere):
        d.mkdir()
    if in_the_way == "link":
        (moddir / "90dmoverlay").symlink_to(elsewhere)
    else:
        (moddir / "90dmoverlay" / "installed.conf").mkdir(parents=True)
    result = _dmoverlay("install", "--moddir", str(moddir), "--confdir", str(confdir))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert list(elsewhere.iterdir()) == [] and list(confdir.iterdir()) == []


def test_install_writes_and_says_what(tmp_path: Path) -> None:
    moddir, confdir = tmp_path / "modules.d", tmp_path / "conf.d"
    moddir.mkdir()
    confdir.mkdir()
    result = _dmoverlay("install", "--moddir", str(moddir), "--confdir", str(confdir))
    assert result.returncode == 0, result.stderr
    assert f"wrote {confdir / '90-dmoverlay.conf'}" in result.stdout.splitlines()
    assert (moddir / "90dmoverlay" / "module-setup.sh").is_file()


def test_stage_into_a_missing_directory_is_one_error(tmp_path: Path) -> None:
    result = _dmoverlay("stage", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
