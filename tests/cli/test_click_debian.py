"""The command line works with the click Debian 12 ships (8.1), not only with
the newer one the tests are pinned to: /usr/bin/python3 sees python3-click,
which scripts/provision installs, and this checkout through PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmoverlay.cli import COMMANDS

TOP = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


def system_dmoverlay(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(TOP), "LC_ALL": "C.UTF-8"}
    return subprocess.run([SYSTEM_PYTHON, "-m", "dmoverlay", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)


def test_system_click_is_debians() -> None:
    result = subprocess.run([SYSTEM_PYTHON, "-c", "import click; print(click.__version__)"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr  # python3-click, from scripts/provision
    assert result.stdout.startswith("8.1."), result.stdout


@pytest.mark.parametrize("name", ["", *sorted(COMMANDS)])
def test_every_command_help(name: str) -> None:
    result = system_dmoverlay(*([name] if name else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: " in result.stdout


def test_bad_size_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    result = system_dmoverlay("build", str(tmp_path / "tree"), "-o", str(tmp_path / "out.img"),
                              "--free", "lots")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith("error: Invalid value for '--free'")
    assert not (tmp_path / "out.img").exists()


def test_build_runs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("live\n")
    out = tmp_path / "squashfs.img"
    result = system_dmoverlay("-q", "build", str(tree), "-o", str(out), "--free", "1M",
                              "--compression", "lz4")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
