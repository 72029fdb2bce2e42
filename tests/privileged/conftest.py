"""Every test in this directory is privileged: it needs root and a kernel with
device-mapper, loop and squashfs.

scripts/vmtest runs them (inside its VM, or with --host on a machine that has both)
and sets DMOVERLAY_PRIVILEGED=1.  Without that variable, as in a plain `pytest` on a
host whose kernel has no device-mapper, they are deselected and the summary says so;
asking for them alone there (`pytest tests/privileged`, `-m privileged`) then runs no
test, which pytest reports as a failure (exit 5).  With it, a missing kernel feature
is an error in every test and a skip counts as a failure: a privileged test that did
not run must never look like a pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import samples
from tests.conftest import loop_backings

ENV = "DMOVERLAY_PRIVILEGED"
HERE = Path(__file__).resolve().parent
_deselected = pytest.StashKey[int]()


def privileged_run() -> bool:
    return os.environ.get(ENV) == "1"


def _is_here(item: pytest.Item) -> bool:
    return HERE in Path(item.path).resolve().parents


def _name(item: pytest.Item) -> str:
    # A node id is relative to the rootdir, and empty of a path outside it.
    return f"{item.path}{item.nodeid}" if item.nodeid.startswith("::") else item.nodeid


@pytest.hookimpl(tryfirst=True)  # before `-m privileged` selects on the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    strays = [_name(i) for i in items if not _is_here(i) and i.get_closest_marker("privileged")]
    if strays:
        raise pytest.UsageError(
            "privileged tests must live in tests/privileged, where scripts/vmtest runs "
            "them: " + ", ".join(strays))
    mine = [i for i in items if _is_here(i)]
    for item in mine:
        item.add_marker(pytest.mark.privileged)
    if mine and not privileged_run():
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if not _is_here(i)]
        config.stash[_deselected] = len(mine)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    count = config.stash.get(_deselected, 0)
    if count:
        terminalreporter.write_line(
            f"tests/privileged: {count} tests deselected ({ENV} is not 1); they need root "
            "and device-mapper: scripts/vmtest runs them in a VM, scripts/vmtest --host "
            "on a machine that has both")


def _kernel_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    control = Path("/dev/mapper/control")
    if not control.is_char_device():
        problems.append(f"{control} is missing (no device-mapper; modprobe dm-mod?)")
    try:
        targets = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, timeout=30, check=False)
        names = {line.split()[0] for line in targets.stdout.splitlines() if line.split()}
        if targets.returncode != 0 or "snapshot" not in names:
            said = (targets.stderr.strip() or targets.stdout.strip()).splitlines()
            problems.append("no dm-snapshot target (modprobe dm-snapshot?)"
                            + (f": dmsetup said {said[0]!r}" if said else ""))
    except (OSError, subprocess.TimeoutExpired) as e:
        problems.append(f"dmsetup targets failed: {e}")
    if not Path("/dev/loop-control").is_char_device():
        problems.append("/dev/loop-control is missing (modprobe loop?)")
    filesystems = Path("/proc/filesystems").read_text().split()
    problems += [f"no {fs} in /proc/filesystems (modprobe {fs}?)"
                 for fs in ("squashfs", "ext4", "tmpfs") if fs not in filesystems]
    return problems


@pytest.fixture(scope="session", autouse=True)
def privileged_kernel() -> None:
    """Fails (never skips) every test here when the machine cannot run them."""
    problems = _kernel_problems()
    if problems:
        pytest.fail("privileged run on an unfit machine: " + "; ".join(problems),
                    pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if privileged_run() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped in the privileged run ({reason}); here a test that "
                           "does not run is a failure")


# ------------------------------------------------------------------ dmoverlay as a command


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dmoverlay", *args], capture_output=True,
                            text=True, check=False, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"dmoverlay {' '.join(args)} failed:\n{result.stderr}")
    return result


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def resources() -> tuple[list[str], list[str], list[str]]:
    """Loop devices in use, device-mapper devices, mounts: what a fault must not leave."""
    loops = sorted(loop_backings())
    dms = sorted(subprocess.run(["dmsetup", "ls"], capture_output=True, text=True,
                                check=True).stdout.split("\n"))
    mounts = sorted(line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines())
    return loops, dms, mounts


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A runtime built by `dmoverlay build`, as a squashfs.img and as a disk image
    whose second partition (DMOTEST-overlay) is a raw persistent overlay."""
    top = tmp_path_factory.mktemp("images")
    tree = top / "tree"
    samples.make_plain_tree(tree)
    cli("-q", "build", str(tree), "-o", str(top / "squashfs.img"), "--free", "256M",
        "--compression", "zstd", "--disk", str(top / "disk.img"), "--disk-label", "DMOTEST",
        "--overlay-size", "32M")
    return {"squashfs": top / "squashfs.img", "disk": top / "disk.img", "tree": tree}


@pytest.fixture
def place(tmp_path: Path) -> Iterator[dict[str, Path]]:
    target = tmp_path / "sysroot"
    target.mkdir()
    state = tmp_path / "state"
    name = f"t{os.getpid()}-{abs(hash(tmp_path.name)) % 10000}"
    yield {"target": target, "state": state, "name": Path(name), "top": tmp_path}
    cli("teardown", "--name", name, "--state-dir", str(state), check=False)


def setup_args(image: Path | str, p: dict[str, Path], *extra: str) -> list[str]:
    return ["setup", str(image), "--target", str(p["target"]), "--name", str(p["name"]),
            "--state-dir", str(p["state"]), *extra]


def teardown(p: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return cli("teardown", "--name", str(p["name"]), "--state-dir", str(p["state"]))


def status(p: dict[str, Path]) -> dict[str, Any]:
    out = cli("status", "--name", str(p["name"]), "--state-dir", str(p["state"]), "--json",
              check=False).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def write_until_it_fails(path: Path, mib: int) -> None:
    """Write up to `mib` MiB, synced as it goes: past a full overlay the
    kernel fails a write (OSError, which the caller expects)."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
