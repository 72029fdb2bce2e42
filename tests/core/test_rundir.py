"""RUNDIR/dmoverlay is trusted only as this user's private directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmoverlay.core.rundir import open_private, why_not_private


def _open(parent: Path, name: str = "dmoverlay") -> str | None:
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got, why = open_private(name, dir_fd=fd)
        if got >= 0:
            assert why is None
            assert os.fstat(got).st_ino == os.stat(parent / name).st_ino
            os.close(got)
        return why
    finally:
        os.close(fd)


def test_a_private_directory_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "dmoverlay").mkdir(mode=0o700)
    assert _open(tmp_path) is None
    assert why_not_private(os.lstat(tmp_path / "dmoverlay")) is None


def test_a_link_to_a_private_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "dmoverlay").symlink_to("elsewhere")
    assert _open(tmp_path) == "a symlink"
    assert why_not_private(os.lstat(tmp_path / "dmoverlay")) == "a symlink"


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dmoverlay").mkdir()
    os.chmod(tmp_path / "dmoverlay", 0o777)
    assert _open(tmp_path) == "writable by others (mode 777)"


def test_a_missing_directory_says_so(tmp_path: Path) -> None:
    assert _open(tmp_path) == "No such file or directory"


def test_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dmoverlay").write_text("")
    assert _open(tmp_path) == "not a directory"
    assert why_not_private(os.lstat(tmp_path / "dmoverlay")) == "not a directory"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dmoverlay").mkdir(mode=0o700)
    os.chown(tmp_path / "dmoverlay", 4321, 4321)
    assert _open(tmp_path) == "owned by uid 4321"
