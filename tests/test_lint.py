"""ruff, mypy and shellcheck are part of the test suite."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHELLS = {"sh", "bash", "dash"}
# Trees of tools and caches, not of the project ("." ones but CI's own).
SKIPPED_DIRS = {".venv", "__pycache__", "node_modules"}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=TOP, capture_output=True, text=True, check=False)


def test_ruff() -> None:
    result = _run(str(BIN / "ruff"), "check", "dmoverlay", "tests", "bench", "scripts/vmtest")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def is_shell_script(path: Path) -> bool:
    """A file named *.sh, or whose #! line runs sh, bash or dash (directly
    or through env)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False  # a fifo (a demo's tree has one) would hang the open
    except OSError:
        return False
    if path.suffix == ".sh":
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return False
    words = first[2:].decode(errors="replace").split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
    return bool(words) and os.path.basename(words[0]) in SHELLS


def shell_scripts() -> list[str]:
    """Every shell script of the repository, as a path from its top: those
    git tracks, or in a copy without git, those the walk finds."""
    tracked = subprocess.run(["git", "-C", str(TOP), "ls-files", "-z"], capture_output=True)
    if tracked.returncode == 0 and tracked.stdout:
        names = os.fsdecode(tracked.stdout).split("\0")
        return sorted(n for n in names if n and is_shell_script(TOP / n))
    found = []
    for dirpath, dirnames, filenames in os.walk(TOP):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS
                             and (not d.startswith(".") or d == ".ci")
                             and not d.endswith(".egg-info"))
        found += [os.path.relpath(os.path.join(dirpath, name), TOP) for name in filenames
                  if is_shell_script(Path(dirpath, name))]
    return sorted(found)


def test_the_shell_scripts_are_found() -> None:
    assert {".ci/run", "scripts/demo", "scripts/demo-live", "scripts/provision",
            "scripts/provision-vm", "scripts/test"} <= set(shell_scripts())
    assert "scripts/vmtest" not in shell_scripts()  # Python


def test_shellcheck() -> None:
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.fail("shellcheck not found: the shell scripts are linted with it; "
                    "install it with scripts/provision (apt-get install shellcheck, "
                    "dnf install ShellCheck)")
    result = _run(tool, "--external-sources", *shell_scripts())
    assert result.returncode == 0, result.stdout + result.stderr
