from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import samples

ROOT = os.geteuid() == 0


TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _check_every_file_collected(config, items)
    for item in items:
        if item.get_closest_marker("root") and not ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root (loop mounts to check images)"))


def _check_every_file_collected(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A whole run must collect every test file: pytest passes over some
    directories by name (it skipped tests/build once) without a word."""
    if [Path(a).resolve() for a in config.args] != [TESTS]:
        return
    files = {p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts}
    seen = {Path(str(item.fspath)).resolve() for item in items}
    # deselected before this runs: outside the VM, and without DMOVERLAY_BOOT=1
    deselected = {TESTS / "privileged", TESTS / "realboot"}
    missed = sorted(str(f.relative_to(TESTS)) for f in files - seen
                    if not any(d in f.parents for d in deselected))
    if missed:
        raise pytest.UsageError(f"test files not collected: {', '.join(missed)}")


@pytest.fixture(scope="session")
def rich_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of entry a root filesystem holds (made as root)."""
    if not ROOT:
        pytest.skip("making device nodes and foreign owners needs root")
    root = tmp_path_factory.mktemp("rich") / "root"
    samples.make_rich_tree(root)
    return root


@pytest.fixture(scope="session")
def rich_tar(rich_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rich tree as GNU tar writes it (pax, xattrs, sparse, numeric owners)."""
    archive = tmp_path_factory.mktemp("tar") / "root.tar"
    subprocess.run(
        ["tar", "--create", "--format=posix", "--xattrs", "--xattrs-include=*", "--sparse",
         "--numeric-owner", "-f", str(archive), "-C", str(rich_tree), "."],
        check=True,
    )
    return archive


@pytest.fixture
def plain_tree(tmp_path: Path) -> Path:
    """A small tree any user can make."""
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    return root


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach and write into."""
    d = Path(tempfile.mkdtemp(prefix="dmoverlay-test-"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def dmoverlay(*args: str, user: int | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, optionally as another user (setpriv)."""
    argv = [sys.executable, "-m", "dmoverlay", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    full_env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    full_env.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd,
                          check=False)


@contextmanager
def small_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on a new directory `path` (root only), with mount
    options such as "size=4m", unmounted on exit."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def loop_backings() -> dict[str, str]:
    """The machine's loop devices (loop0...) and the files behind them; a
    device another suite detaches meanwhile is left out, not an error."""
    found = {}
    for path in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            found[path.parent.parent.name] = path.read_text().strip()
        except FileNotFoundError:
            continue
    return found
