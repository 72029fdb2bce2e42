"""doctor: decisions from small synthetic /proc, /sys, /lib/modules and /dev
trees (the missing and present cases), then the real machine, then the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmoverlay import doctor
from dmoverlay.core.errors import BlockDevError
from dmoverlay.doctor import Category, Status, SystemPaths
from dmoverlay.overlay import blockdev

RELEASE = "6.1.0-test"


def fake_system(
    root: Path,
    *,
    filesystems: tuple[str, ...] = ("nodev\ttmpfs", "\text4", "\tsquashfs"),
    misc: tuple[str, ...] = (" 237 loop-control",),
    loaded: tuple[str, ...] | None = ("loop 40960 0 - Live 0x0",),
    sys_modules: tuple[str, ...] = ("loop",),
    builtin: tuple[str, ...] | None = None,
    dep: tuple[str, ...] | None = None,
    dm_control: bool = False,
) -> SystemPaths:
    """A machine as doctor sees it; None leaves that file out."""
    paths = SystemPaths(proc=root / "proc", sys=root / "sys", modules=root / "lib/modules",
                        dev=root / "dev")
    paths.proc.mkdir(parents=True)
    (paths.proc / "filesystems").write_text("".join(f"{line}\n" for line in filesystems))
    (paths.proc / "misc").write_text("".join(f"{line}\n" for line in misc))
    if loaded is not None:
        (paths.proc / "modules").write_text("".join(f"{line}\n" for line in loaded))
    for name in sys_modules:
        (paths.sys / "module" / name).mkdir(parents=True)
    moddir = paths.modules / RELEASE
    moddir.mkdir(parents=True)
    if builtin is not None:
        (moddir / "modules.builtin").write_text("".join(f"{p}\n" for p in builtin))
    if dep is not None:
        (moddir / "modules.dep").write_text("".join(f"{p}\n" for p in dep))
    (paths.dev / "mapper").mkdir(parents=True)
    if dm_control:
        (paths.dev / "mapper" / "control").touch()
    return paths


def kernel(paths: SystemPaths) -> dict[str, doctor.Check]:
    state = doctor.read_kernel_state(paths, release=RELEASE)
    return {c.name: c for c in doctor.kernel_checks(state)}


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize(("path", "name"), [
    ("kernel/drivers/md/dm-snapshot.ko", "dm_snapshot"),
    ("kernel/drivers/md/dm-thin-pool.ko.xz", "dm_thin_pool"),
    ("kernel/fs/overlayfs/overlay.ko.zst", "overlay"),
    ("loop.ko.gz", "loop"),
])
def test_module_name_is_the_kernels_spelling(path: str, name: str) -> None:
    assert doctor.module_name(path) == name


def test_filesystems_with_and_without_nodev_are_read(tmp_path: Path) -> None:
    state = doctor.read_kernel_state(fake_system(tmp_path), release=RELEASE)
    assert state.filesystems == frozenset({"tmpfs", "ext4", "squashfs"})
    assert state.misc == frozenset({"loop-control"})
    assert state.loaded == frozenset({"loop"})


def test_modules_dep_lines_give_module_names(tmp_path: Path) -> None:
    paths = fake_system(tmp_path, dep=(
        "kernel/drivers/md/dm-snapshot.ko.xz: kernel/drivers/md/dm-bufio.ko.xz",
        "kernel/drivers/md/dm-bufio.ko.xz:",
    ))
    state = doctor.read_kernel_state(paths, release=RELEASE)
    assert state.on_disk == frozenset({"dm_snapshot", "dm_bufio"})
    assert state.builtin is None


# ---------------------------------------------------------------- kernel decisions

def test_everything_present_and_loaded(tmp_path: Path) -> None:
    checks = kernel(fake_system(
        tmp_path,
        filesystems=("nodev\ttmpfs", "\text4", "\tsquashfs", "nodev\toverlay"),
        misc=(" 237 loop-control", " 236 device-mapper"),
        loaded=("dm_thin_pool 90112 0 - Live 0x0", "dm_snapshot 53248 0 - Live 0x0",
                "dm_mod 184320 2 dm_thin_pool,dm_snapshot, Live 0x0", "loop 40960 0 - Live 0x0"),
        dm_control=True,
    ))
    assert {name: c.status for name, c in checks.items()} == dict.fromkeys(checks, Status.OK)
    assert set(checks) == {f.name for f in doctor.FEATURES} | {"/dev/mapper/control"}
    assert checks["dm-snapshot"].detail == "loaded module"


def test_module_on_disk_but_not_loaded_is_ok_and_loadable(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, dep=("kernel/drivers/md/dm-snapshot.ko.zst:",)))
    snapshot = checks["dm-snapshot"]
    assert snapshot.status is Status.OK
    assert "loadable" in snapshot.detail
    assert snapshot.hint is not None and "modprobe dm-snapshot" in snapshot.hint


def test_builtin_module_is_ok(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, builtin=("kernel/drivers/md/dm-mod.ko",
                                                   "kernel/drivers/md/dm-snapshot.ko")))
    assert checks["dm-snapshot"].status is Status.OK
    assert checks["dm-snapshot"].detail == "built into the kernel"
    assert checks["dm-mod"].status is Status.OK


def test_sys_module_alone_shows_a_builtin_with_parameters(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, sys_modules=("loop", "dm_snapshot")))
    assert checks["dm-snapshot"].status is Status.OK


def test_dm_snapshot_missing_names_every_fix(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, dep=("kernel/drivers/block/loop.ko:",)))
    snapshot = checks["dm-snapshot"]
    assert snapshot.status is Status.MISSING
    assert "no module on disk" in snapshot.detail
    assert snapshot.hint is not None
    for fix in ("CONFIG_DM_SNAPSHOT", "modprobe dm-snapshot", "scripts/vmtest"):
        assert fix in snapshot.hint
    assert doctor.OVERLAY in snapshot.needed_for


def test_kernel_without_modules_says_so(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, loaded=None))
    assert checks["dm-mod"].status is Status.MISSING
    assert f"no /lib/modules/{RELEASE}/modules.dep" in checks["dm-mod"].detail
    assert "without loadable modules" in checks["dm-mod"].detail
    assert checks["loop"].status is Status.OK  # /proc/misc still shows it


def test_missing_optional_features_only_warn_and_block_nothing(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path))
    for name in ("overlay", "dm-thin-pool"):
        assert checks[name].status is Status.WARN
        assert checks[name].needed_for == ()


def test_tmpfs_has_no_module_to_load(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, filesystems=("\text4",)))
    assert checks["tmpfs"].status is Status.MISSING
    assert checks["tmpfs"].hint is not None
    assert "modprobe" not in checks["tmpfs"].hint


def test_unreadable_proc_and_sys_warn_instead_of_guessing(tmp_path: Path) -> None:
    nowhere = tmp_path / "absent"
    paths = SystemPaths(proc=nowhere, sys=nowhere, modules=nowhere, dev=nowhere)
    checks = kernel(paths)
    assert checks["dm-snapshot"].status is Status.WARN
    assert "cannot tell" in checks["dm-snapshot"].detail


def test_dm_control_present_with_device_mapper(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, misc=(" 236 device-mapper",), dm_control=True))
    assert checks["/dev/mapper/control"].status is Status.OK


def test_dm_control_missing_while_device_mapper_is_loaded(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, misc=(" 236 device-mapper",)))
    control = checks["/dev/mapper/control"]
    assert control.status is Status.WARN
    assert control.hint is not None and "dmsetup mknodes" in control.hint


def test_stale_dm_control_without_device_mapper(tmp_path: Path) -> None:
    checks = kernel(fake_system(tmp_path, dm_control=True))
    assert checks["dm-mod"].status is Status.MISSING
    assert checks["/dev/mapper/control"].status is Status.WARN


# ---------------------------------------------------------------- tools, python, root

def test_tools_found_and_missing(tmp_path: Path) -> None:
    tool = tmp_path / "mkfs.ext4"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    checks = {c.name: c for c in doctor.tool_checks(search_path=str(tmp_path))}
    assert set(checks) == set(doctor.TOOLS)
    assert checks["mkfs.ext4"].status is Status.OK
    assert checks["mkfs.ext4"].detail == str(tool)
    assert checks["mksquashfs"].status is Status.MISSING
    assert checks["mksquashfs"].hint is not None
    assert "apt-get install squashfs-tools" in checks["mksquashfs"].hint
    assert checks["dmsetup"].hint is not None
    assert "dnf install device-mapper" in checks["dmsetup"].hint


def test_python_module_missing_and_present() -> None:
    modules = {
        "json": ("for tests", "python3", "python3", (doctor.BUILD,)),
        "no_such_module_for_dmoverlay": ("for nothing", "python3-nsm", "python3-nsm", ()),
    }
    checks = {c.name: c for c in doctor.python_checks(modules)}
    assert checks["json"].status is Status.OK
    missing = checks["no_such_module_for_dmoverlay"]
    assert missing.status is Status.MISSING
    assert missing.hint is not None and "apt-get install python3-nsm" in missing.hint


def test_not_root_warns_and_blocks_only_the_overlay(tmp_path: Path) -> None:
    root, _ = doctor.privilege_checks(1000, fuse_device=str(tmp_path / "none"))
    assert root.status is Status.WARN
    assert root.needed_for == (doctor.OVERLAY,)
    assert doctor.privilege_checks(0)[0].status is Status.OK


def test_images_as_a_user_need_fuse_open_to_them(tmp_path: Path) -> None:
    """mkupdates reads build's images without root through FUSE."""
    _, missing = doctor.privilege_checks(1000, fuse_device=str(tmp_path / "none"))
    assert (missing.status, missing.needed_for) == (Status.WARN, (doctor.IMAGES_AS_USER,))
    assert missing.detail.startswith("missing: ")
    node = tmp_path / "fuse"
    node.write_bytes(b"")
    node.chmod(0o666)
    assert doctor.privilege_checks(1000, fuse_device=str(node))[1].status is Status.OK
    assert doctor.privilege_checks(0, fuse_device=str(tmp_path / "none"))[1].ok


def test_images_as_a_user_are_not_ready_without_fuse2fs(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    report = doctor.diagnose(paths=fake_system(tmp_path / "sys"), release=RELEASE, euid=0,
                             search_path=str(empty))
    assert {"fuse2fs", "fusermount3", "unsquashfs"} <= {
        c.name for c in report.blocking(doctor.IMAGES_AS_USER)}


# ---------------------------------------------------------------- loop devices and mounts

UTIL = blockdev.Choice(blockdev.UTIL_LINUX, "libblockdev's Python binding is not installed")


def test_backend_libblockdev_when_it_loads() -> None:
    choice = blockdev.Choice(blockdev.LIBBLOCKDEV, "its binding and plugins load")
    check = doctor.backend_check(choice, None, ["losetup"], "2.0")
    assert check.status is Status.OK
    assert check.detail == "libblockdev, API 2.0 (its binding and plugins load)"


def test_backend_util_linux_with_its_tools() -> None:
    check = doctor.backend_check(UTIL, BlockDevError("no binding"), [], None)
    assert check.status is Status.OK
    assert check.detail == ("util-linux: losetup, mount, umount "
                            "(libblockdev's Python binding is not installed)")


def test_backend_util_linux_without_its_tools_is_missing() -> None:
    check = doctor.backend_check(UTIL, BlockDevError("no binding"), ["losetup", "umount"], None)
    assert check.status is Status.MISSING
    assert "losetup, umount not found" in check.detail
    assert check.hint is not None and "apt-get install mount" in check.hint


def test_backend_libblockdev_forced_but_missing() -> None:
    choice = blockdev.Choice(blockdev.LIBBLOCKDEV, "set by DMOVERLAY_BLOCKDEV")
    check = doctor.backend_check(choice, BlockDevError("no binding", hint="install it"), [],
                                 None)
    assert check.status is Status.MISSING
    assert check.detail == "libblockdev (set by DMOVERLAY_BLOCKDEV) cannot be used: no binding"
    assert check.hint == "install it"


def _diagnose_in_child(env: dict[str, str], *, block_gi: bool) -> dict[str, dict[str, object]]:
    """doctor's checks in a fresh interpreter, where gi can be made to fail
    to import before anything looks for it."""
    code = ("import json, sys\n"
            + ("sys.modules['gi'] = None\n" if block_gi else "")
            + "from dmoverlay import doctor\n"
            "print(json.dumps(doctor.diagnose().to_dict()))\n")
    full = {k: v for k, v in os.environ.items() if k != blockdev.ENV} | env
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, check=False)
    assert proc.returncode == 0, proc.stderr
    return {str(c["name"]): c for c in json.loads(proc.stdout)["checks"]}


def test_without_libblockdev_util_linux_is_ok_with_a_note() -> None:
    checks = _diagnose_in_child({}, block_gi=True)
    backend = checks["backend"]
    assert backend["status"] == "ok"
    assert str(backend["detail"]).startswith("util-linux: losetup, mount, umount (")
    for name in ("BlockDev", "plugin loop", "plugin fs"):
        assert checks[name]["status"] == "ok", checks[name]
        assert str(checks[name]["detail"]).endswith("; not needed: setup uses util-linux")
        assert checks[name]["needed_for"] == []
    assert checks["BlockDev"]["hint"] is not None  # still says how to get it


def test_without_libblockdev_forced_to_it_is_missing() -> None:
    checks = _diagnose_in_child({blockdev.ENV: blockdev.LIBBLOCKDEV}, block_gi=True)
    assert checks["backend"]["status"] == "missing"
    assert checks["BlockDev"]["status"] == "missing"
    assert checks["BlockDev"]["needed_for"] == [doctor.OVERLAY]


def test_a_bad_backend_variable_is_a_missing_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(blockdev.ENV, "gi")
    backend = {c.name: c for c in doctor.blockdev_checks()}["backend"]
    assert backend.status is Status.MISSING
    assert backend.detail.startswith(f"{blockdev.ENV}='gi' is not a backend")


def test_util_linux_forced_with_libblockdev_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(blockdev.ENV, blockdev.UTIL_LINUX)
    checks = {c.name: c for c in doctor.blockdev_checks()}
    assert checks["backend"].status is Status.OK
    assert checks["backend"].detail.endswith(f"(set by {blockdev.ENV})")
    assert checks["BlockDev"].status is Status.OK


# ---------------------------------------------------------------- report

def test_build_is_not_ready_without_its_tools(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    report = doctor.diagnose(paths=fake_system(tmp_path / "sys"), release=RELEASE,
                             euid=0, search_path=str(empty))
    assert not report.ready(doctor.BUILD)
    assert {c.name for c in report.blocking(doctor.BUILD)} == {"mkfs.ext4", "debugfs",
                                                               "mksquashfs"}
    assert "build: not ready (mkfs.ext4, debugfs, mksquashfs)" in doctor.verdicts(report)


def test_missing_device_mapper_does_not_stop_build(tmp_path: Path) -> None:
    report = doctor.diagnose(paths=fake_system(tmp_path), release=RELEASE, euid=0)
    assert report.find("dm-mod").status is Status.MISSING
    assert report.ready(doctor.BUILD)
    assert not report.ready(doctor.OVERLAY)
    text = doctor.format_text(report)
    assert "device-mapper is missing" in text
    assert "scripts/vmtest" in text


def test_text_groups_by_category_and_counts(tmp_path: Path) -> None:
    report = doctor.diagnose(paths=fake_system(tmp_path), release=RELEASE, euid=0)
    text = doctor.format_text(report)
    headers = [line for line in text.splitlines() if line in {c.value for c in Category}]
    assert headers == [c.value for c in Category]
    counts = f"{report.count(Status.OK)} ok, {report.count(Status.MISSING)} missing, " \
             f"{report.count(Status.WARN)} warn"
    assert counts in text.splitlines()
    assert sum(report.count(s) for s in Status) == len(report.checks)
    # one row per check, in category order, every detail in the same column
    rows = [line for line in text.splitlines() if re.match(r"  (ok|missing|warn) ", line)]
    ordered = sorted(report.checks, key=lambda c: list(Category).index(c.category))
    assert len(rows) == len(ordered)
    for row, c in zip(rows, ordered, strict=True):
        assert row.split()[0] == c.status.value
        assert row[11:].startswith(f"{c.name} ")
    assert len({row.rindex(c.detail) for row, c in zip(rows, ordered, strict=True)}) == 1


# ---------------------------------------------------------------- the real machine

def _dm_snapshot_on_this_machine() -> bool:
    """Independently of doctor: is dm-snapshot in or beside this kernel?"""
    if Path("/sys/module/dm_snapshot").exists():
        return True
    moddir = Path("/lib/modules", os.uname().release)
    for listing in ("modules.dep", "modules.builtin"):
        try:
            if "dm-snapshot.ko" in (moddir / listing).read_text():
                return True
        except OSError:
            pass
    return False


def test_real_machine() -> None:
    dm_before = os.path.exists("/dev/mapper/control")
    report = doctor.diagnose()
    # The runtime needs these and they work on every machine we test on.
    for name in ("loop", "squashfs", "ext4", "tmpfs"):
        assert report.find(name).status is Status.OK, report.find(name)
    assert report.find("BlockDev").status is Status.OK
    assert report.find("backend").status is Status.OK
    assert report.ready(doctor.BUILD)
    device_mapper = "device-mapper" in Path("/proc/misc").read_text().split()
    dm_mod = report.find("dm-mod")
    snapshot = report.find("dm-snapshot")
    if not _dm_snapshot_on_this_machine():
        # This development machine's kernel: no device-mapper at all.
        assert snapshot.status is Status.MISSING
        assert snapshot.hint is not None and "scripts/vmtest" in snapshot.hint
        assert "CONFIG_DM_SNAPSHOT" in snapshot.hint
    else:
        assert snapshot.status is Status.OK
    assert (dm_mod.status is Status.OK) == (device_mapper or dm_mod.detail.startswith("loadable"))
    # Looking changes nothing: libdevmapper would create this node on its first call.
    assert os.path.exists("/dev/mapper/control") == dm_before


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_runs_as_a_normal_user_without_hanging() -> None:
    code = ("import json; from dmoverlay import doctor; "
            "print(json.dumps(doctor.diagnose().to_dict()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, user=65534, group=65534, extra_groups=[],
                          cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/",
                                        "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["root"]["status"] == "warn"
    assert checks["plugin loop"]["status"] == "ok"
    assert proc.stderr == ""


# ---------------------------------------------------------------- the command

def test_cli_text() -> None:
    from dmoverlay.cli.doctor import command

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\d+ ok, \d+ missing, \d+ warn$", result.output, re.M)
    assert "build: ready" in result.output
    if "device-mapper" not in Path("/proc/misc").read_text().split():
        assert "device-mapper is missing" in result.output


def test_cli_json() -> None:
    from dmoverlay.cli.doctor import command

    result = CliRunner().invoke(command, ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    checks = data["checks"]
    assert {"name", "category", "status", "detail", "hint", "needed_for"} <= set(checks[0])
    for status in Status:
        assert data["summary"][status.value] == sum(c["status"] == status for c in checks)
    assert data["summary"]["ready"]["build"] is True
    assert {c["name"] for c in checks} >= {"mkfs.ext4", "dm-snapshot", "plugin fs", "root"}


def test_cli_exit_code_says_whether_build_can_run(tmp_path: Path) -> None:
    from dmoverlay.cli.doctor import EXIT_NOT_BUILD_READY, exit_code

    empty = tmp_path / "bin"
    empty.mkdir()
    paths = fake_system(tmp_path / "sys")
    ready = doctor.diagnose(paths=paths, release=RELEASE, euid=1000)
    assert exit_code(ready) == 0
    unready = doctor.diagnose(paths=paths, release=RELEASE, euid=1000, search_path=str(empty))
    assert exit_code(unready) == EXIT_NOT_BUILD_READY != 0
