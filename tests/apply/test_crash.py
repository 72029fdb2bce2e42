"""A process killed at any point of an apply leaves each file old or new,
never torn; rollback then restores the original tree exactly, and running
the apply again converges on the new one."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from dmoverlay.apply.execute import ApplyOptions, rollback
from tests.applykit import Item, fix_times, make_root, snapshot, without_dir_times

DRIVER = """
import sys
from pathlib import Path
from tests.applykit import apply, d, f, hard, link, other
from dmoverlay.core.entries import Kind
top, jobs = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
apply(top, top / "live/root", top / "live/run", jobs=jobs, entries=[
    d("lib"), f("lib/libfoo.so", b"new libfoo" * 1000), f("lib/libnew.so", b"n"),
    f("etc/resolv.conf", b"nameserver 10.0.0.1"), f("etc/os-release", b"ID=new"),
    d("opt"), d("opt/app", 0o750), f("opt/app/bin", b"bin", 0o755), hard("opt/app/bin2",
    "opt/app/bin"), link("usr/bin/newlink", "tool"), f("run/flag", b"on"),
    other("etc/keep.d/.wh.a.conf", Kind.FILE), f("usr/bin/tool", b"new tool", 0o755),
])
"""
# the journal's first sync + 2 directories made + 9 entries prepared + 9
# renamed in + 1 whiteout: every point a crash can fall between
CHANGE_POINTS = 1 + 2 + 9 + 9 + 1


Snapshots = dict[str, dict[str, Item]]


def _new_tree(top: Path) -> tuple[Snapshots, Snapshots]:
    """What the update makes of a fresh root (computed once, uninterrupted)."""
    root, run = make_root(top / "live")
    old = snapshot(root), snapshot(run)
    subprocess.run([sys.executable, "-c", DRIVER, str(top)], check=True)
    new = snapshot(root), snapshot(run)
    return {"old": old[0], "new": new[0]}, {"old": old[1], "new": new[1]}


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Snapshots, Snapshots]:
    return _new_tree(tmp_path_factory.mktemp("reference"))


def _each_file_old_or_new(now: dict[str, Item], old: dict[str, Item],
                          new: dict[str, Item]) -> None:
    for path, item in now.items():
        if ".dmoverlay-" in path or item.kind == "dir":
            continue  # a prepared temporary file, or a directory still being made
        assert item in (old.get(path), new.get(path)), f"{path} is neither old nor new"


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("point", range(1, CHANGE_POINTS + 2))
def test_killed_at_any_point(point: int, jobs: int, tmp_path: Path,
                             expected: tuple[Snapshots, Snapshots]) -> None:
    """With two processes writing, each counts the points it passes (a
    worker starts from its parent's count) and the first to reach `point`
    kills the apply: more interleavings, fewer points reached."""
    root_exp, run_exp = expected
    root, run = make_root(tmp_path / "live")
    old_root, old_run = snapshot(root), snapshot(run)
    assert old_root == root_exp["old"]
    env = {**os.environ, "DMOVERLAY_CRASH_AT": str(point)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), str(jobs)], env=env,
                          capture_output=True, text=True, check=False)
    _wait_for_workers(tmp_path)
    # a worker that reaches the point kills its parent (-9) and ends with 86
    crashed = proc.returncode in (86, -signal.SIGKILL)
    if jobs == 1:
        assert crashed or (proc.returncode == 0 and point > CHANGE_POINTS), proc.stderr
    else:
        assert crashed or proc.returncode == 0, proc.stderr
        assert crashed or point > CHANGE_POINTS // 2, "a crash point before the split was missed"
    _each_file_old_or_new(snapshot(root), root_exp["old"], root_exp["new"])
    _each_file_old_or_new(snapshot(run), run_exp["old"], run_exp["new"])
    if point % 2:
        rollback(ApplyOptions(root, run))
        assert snapshot(root) == old_root
        assert snapshot(run) == old_run
    else:  # the next apply first undoes the torn one, then applies in full
        subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), str(jobs)], check=True)
        assert without_dir_times(snapshot(root)) == without_dir_times(root_exp["new"])
        assert without_dir_times(snapshot(run)) == without_dir_times(run_exp["new"])


def test_the_crash_points_are_all_reached(tmp_path: Path) -> None:
    """The last point really is the last one: one more lets the apply finish."""
    make_root(tmp_path / "live")
    env = {**os.environ, "DMOVERLAY_CRASH_AT": str(CHANGE_POINTS)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], env=env, check=False)
    assert proc.returncode == 86


BIG_DRIVER = """
import sys
from pathlib import Path
from tests.applykit import apply, f
top, jobs = Path(sys.argv[1]), int(sys.argv[2])
files = [f(f"lib/mod{i // 50}/file{i}.so", bytes([i % 251]) * (2000 + i)) for i in range(400)]
files += [f(f"etc/conf{i}", b"new") for i in range(0, 400, 7)]
apply(top, top / "live/root", top / "live/run", files, jobs=jobs)
"""


@pytest.mark.parametrize("trial", range(16))
def test_killed_at_a_random_moment(trial: int, tmp_path: Path) -> None:
    """SIGKILL after a random delay, as a power cut would come; half the
    trials with the files split over two processes (only the first is
    killed: its workers die with it)."""
    root, run = make_root(tmp_path / "live")
    for i in range(0, 400, 7):
        (root / f"etc/conf{i}").write_text("old")
    old_root = snapshot(root)
    delay = random.Random(trial).uniform(0.05, 0.6)
    proc = subprocess.Popen([sys.executable, "-c", BIG_DRIVER, str(tmp_path), str(1 + trial % 2)])
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_for_workers(tmp_path)
    for path, item in snapshot(root).items():
        if ".dmoverlay-" in path or item.kind == "dir":
            continue
        if path.startswith("etc/conf"):
            assert item.data in (sha(b"old"), sha(b"new")), path
        elif path.startswith("usr/lib/mod"):
            i = int(path.rsplit("file", 1)[1].removesuffix(".so"))
            assert item.data == sha(bytes([i % 251]) * (2000 + i)), f"{path} is torn"
        else:
            assert item == old_root[path], path
    rollback(ApplyOptions(root, run))
    assert snapshot(root) == old_root


def _wait_for_workers(top: Path) -> None:
    """Workers of a killed apply die with it, a moment later: wait until no
    process is left whose command line names `top`."""
    marker = os.fsencode(top)
    for _ in range(500):
        alive = []
        for proc in Path("/proc").iterdir():
            with suppress(OSError):  # ended meanwhile
                alive.append(proc.name.isdigit() and marker in (proc / "cmdline").read_bytes())
        if not any(alive):
            return
        time.sleep(0.01)
    raise AssertionError(f"a worker of the apply in {top} outlived it")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


REPLACING_DRIVER = """
import sys
from pathlib import Path
from tests.applykit import apply, f, other
from dmoverlay.core.entries import Kind
top, jobs = Path(sys.argv[1]), int(sys.argv[2])
apply(top, top / "live/root", top / "live/run", jobs=jobs, entries=[
    other("srv/.wh.data", Kind.FILE), f("srv/data/new", b"new"), f("srv/data/old", b"again"),
    other(".wh.lib", Kind.FILE), f("lib/libnew.so", b"n"),
    other("srv/.wh.empty", Kind.FILE), f("srv/empty/x", b"x"),
])
"""
# the journal's sync + 3 whiteouts + 3 directories made again + 4 entries
# prepared + 4 renamed in
REPLACING_POINTS = 1 + 3 + 3 + 4 + 4


def _replacing_root(top: Path) -> tuple[Path, Path]:
    root, run = make_root(top / "live")
    (root / "srv/data/sub").mkdir(parents=True)
    (root / "srv/data/old").write_bytes(b"old")
    (root / "srv/data/sub/deep").write_bytes(b"deep")
    (root / "srv/empty").mkdir()  # an undo that took it for its own removed it
    fix_times(root)
    return root, run


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("point", range(1, REPLACING_POINTS + 2))
def test_killed_while_whited_out_directories_are_made_again(point: int, jobs: int,
                                                           tmp_path: Path) -> None:
    """OCI's way to replace a directory (or a linked one): the old one goes
    to the journal first, the new one is made empty; a kill at any point,
    then rollback or the next apply, gives the old tree or the new."""
    root, _ = _replacing_root(tmp_path / "reference")
    subprocess.run([sys.executable, "-c", REPLACING_DRIVER, str(tmp_path / "reference"), "1"],
                   check=True)
    new = without_dir_times(snapshot(root))
    root, run = _replacing_root(tmp_path)
    old = snapshot(root)
    env = {**os.environ, "DMOVERLAY_CRASH_AT": str(point)}
    driver = [sys.executable, "-c", REPLACING_DRIVER, str(tmp_path), str(jobs)]
    proc = subprocess.run(driver, env=env, capture_output=True, text=True, check=False)
    _wait_for_workers(tmp_path)
    crashed = proc.returncode in (86, -signal.SIGKILL)
    assert crashed or (proc.returncode == 0 and (jobs > 1 or point > REPLACING_POINTS)), \
        proc.stderr
    if point % 2:
        rollback(ApplyOptions(root, run))
        assert snapshot(root) == old
    else:
        subprocess.run(driver, check=True)
        assert without_dir_times(snapshot(root)) == new
    assert not (root / ".dmoverlay/journal").exists() or \
        not [p for p in (root / ".dmoverlay/journal").iterdir() if p.name.endswith(".failed")]
