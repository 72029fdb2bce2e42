"""What this machine can do for dmoverlay, and what is missing.

Each check has a status (ok / missing / warn), a detail and a hint naming the
fix, and says which jobs need it: `build` (making images, no root), `inspect`
(reading them back) and `overlay` (setting up the device-mapper overlay, and
the privileged tests).  The probes only look: they read /proc, /sys and
/lib/modules, search PATH and import modules; they run nothing, need no root
and cannot block.  Their roots are parameters, so tests can point them at
small synthetic trees.  Decisions are pure functions of what was read.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from dmoverlay.core import run
from dmoverlay.core.errors import BlockDevError, UsageError, install_hint
from dmoverlay.overlay import blockdev, libblockdev, utillinux


class Status(StrEnum):
    OK = "ok"
    MISSING = "missing"
    WARN = "warn"


class Category(StrEnum):
    TOOLS = "tools"
    PYTHON = "python"
    BLOCKDEV = "libblockdev"
    KERNEL = "kernel"
    PRIVILEGES = "privileges"


BUILD = "build"
INSPECT = "inspect"
OVERLAY = "overlay"
IMAGES_AS_USER = "images-as-user"  # mkupdates reading build's images without root (FUSE)
PURPOSES = (BUILD, INSPECT, OVERLAY, IMAGES_AS_USER)
FUSE_DEVICE = "/dev/fuse"

VMTEST = "run the privileged tests in the project's VM instead: scripts/vmtest"


@dataclass(frozen=True)
class Check:
    name: str
    category: Category
    status: Status
    detail: str
    hint: str | None = None
    needed_for: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "category": self.category.value,
                "status": self.status.value, "detail": self.detail, "hint": self.hint,
                "needed_for": list(self.needed_for)}


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]
    kernel: str

    def count(self, status: Status) -> int:
        return sum(1 for c in self.checks if c.status is status)

    def blocking(self, purpose: str) -> tuple[Check, ...]:
        """The checks a job needs that are not ok."""
        return tuple(c for c in self.checks if purpose in c.needed_for and not c.ok)

    def ready(self, purpose: str) -> bool:
        return not self.blocking(purpose)

    def find(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def to_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "checks": [c.to_dict() for c in self.checks],
            "summary": {
                **{s.value: self.count(s) for s in Status},
                "ready": {p: self.ready(p) for p in PURPOSES},
            },
        }


# ---------------------------------------------------------------- tools

# tool -> the jobs that need it
TOOLS: Mapping[str, tuple[str, ...]] = {
    "mkfs.ext4": (BUILD,),
    "debugfs": (BUILD,),
    "mksquashfs": (BUILD,),
    "unsquashfs": (INSPECT, IMAGES_AS_USER),
    "fuse2fs": (IMAGES_AS_USER,),
    "fusermount3": (IMAGES_AS_USER,),
    "dmsetup": (OVERLAY,),
    "losetup": (OVERLAY,),
    "mount": (OVERLAY,),
    "umount": (OVERLAY,),
    "blkid": (OVERLAY,),
    "modprobe": (OVERLAY,),
}


def tool_checks(*, search_path: str | None = None) -> list[Check]:
    """Each tool found on search_path (default: the PATH commands run with)."""
    path = search_path if search_path is not None else run.clean_env()["PATH"]
    checks = []
    for tool, needed_for in TOOLS.items():
        found = shutil.which(tool, path=path)
        if found:
            checks.append(Check(tool, Category.TOOLS, Status.OK, found, None, needed_for))
        else:
            checks.append(Check(tool, Category.TOOLS, Status.MISSING, "not found",
                                install_hint([tool]), needed_for))
    return checks


# ---------------------------------------------------------------- python

# module -> (what it is for, Debian package, Fedora package, jobs)
PYTHON_MODULES: Mapping[str, tuple[str, str, str, tuple[str, ...]]] = {
    "click": ("for the command line", "python3-click", "python3-click", (BUILD,)),
    "parted": ("for build --disk", "python3-parted", "python3-pyparted", (BUILD,)),
}


def python_checks(
    modules: Mapping[str, tuple[str, str, str, tuple[str, ...]]] = PYTHON_MODULES,
) -> list[Check]:
    checks = []
    for module, (purpose, debian, fedora, needed_for) in modules.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            checks.append(Check(
                module, Category.PYTHON, Status.MISSING, f"cannot import: {exc}",
                f"install it: apt-get install {debian} (Debian), dnf install {fedora} "
                f"(Fedora), then recreate the virtualenv with --system-site-packages, "
                f"or run scripts/provision", needed_for))
        else:
            checks.append(Check(module, Category.PYTHON, Status.OK, f"importable ({purpose})",
                                None, needed_for))
    return checks


# ---------------------------------------------------------------- loop devices and mounts

def backend_check(choice: blockdev.Choice, problem: BlockDevError | None,
                  missing_tools: list[str], version: str | None) -> Check:
    """The backend setup would use for loop devices and mounts, from what
    blockdev chose, why libblockdev cannot serve (None: it can) and which of
    util-linux's tools are missing."""
    def check(status: Status, detail: str, hint: str | None = None) -> Check:
        return Check("backend", Category.BLOCKDEV, status, detail, hint, (OVERLAY,))

    if choice.name == blockdev.LIBBLOCKDEV:
        if problem is not None:
            return check(Status.MISSING, f"libblockdev ({choice.why}) cannot be used: "
                         f"{problem.message}", problem.hint)
        return check(Status.OK, f"libblockdev, API {version} ({choice.why})")
    tools = ", ".join(utillinux.TOOLS)
    if missing_tools:
        return check(Status.MISSING, f"util-linux ({choice.why}), but "
                     f"{', '.join(missing_tools)} not found", install_hint(missing_tools))
    return check(Status.OK, f"util-linux: {tools} ({choice.why})")


def _not_needed(check: Check) -> Check:
    """A libblockdev check that fails where setup uses util-linux: a note."""
    if check.ok:
        return check
    return replace(check, status=Status.OK, needed_for=(),
                   detail=f"{check.detail}; not needed: setup uses util-linux")


def libblockdev_checks(version: str | None) -> list[Check]:
    """The BlockDev API version, then whether each plugin dmoverlay uses loads."""
    if version is None:
        hint = ("install it: apt-get install python3-gi gir1.2-blockdev-2.0 python3-blockdev "
                "(Debian 12), dnf install python3-blockdev (Fedora), or run scripts/provision")
        api = Check("BlockDev", Category.BLOCKDEV, Status.MISSING,
                    "gi.repository.BlockDev cannot be imported (tried API 3.0 and 2.0)",
                    hint, (OVERLAY,))
        plugins = [Check(f"plugin {p}", Category.BLOCKDEV, Status.MISSING,
                         "no libblockdev binding", hint, (OVERLAY,))
                   for p in libblockdev.PLUGINS]
        return [api, *plugins]
    checks = [Check("BlockDev", Category.BLOCKDEV, Status.OK, f"API {version}", None,
                    (OVERLAY,))]
    for plugin in libblockdev.PLUGINS:
        name = f"plugin {plugin}"
        try:
            libblockdev.load(plugin)
        except BlockDevError as exc:
            checks.append(Check(name, Category.BLOCKDEV, Status.MISSING, exc.message,
                                exc.hint, (OVERLAY,)))
        else:
            checks.append(Check(name, Category.BLOCKDEV, Status.OK,
                                libblockdev.so_name(plugin, version), None, (OVERLAY,)))
    return checks


def blockdev_checks(*, search_path: str | None = None) -> list[Check]:
    """The backend setup would use, then libblockdev's checks: needed only
    when setup would use it."""
    path = search_path if search_path is not None else run.clean_env()["PATH"]
    missing = [t for t in utillinux.TOOLS if shutil.which(t, path=path) is None]
    version = libblockdev.api_version()
    checks = libblockdev_checks(version)
    try:
        choice = blockdev.choose()
    except UsageError as exc:  # DMOVERLAY_BLOCKDEV names no backend
        return [Check("backend", Category.BLOCKDEV, Status.MISSING, exc.message, exc.hint,
                      (OVERLAY,)), *checks]
    backend = backend_check(choice, libblockdev.problem(), missing, version)
    if choice.name == blockdev.UTIL_LINUX and backend.ok:
        checks = [_not_needed(c) for c in checks]
    return [backend, *checks]


# ---------------------------------------------------------------- kernel

@dataclass(frozen=True)
class Feature:
    """A kernel feature and every place its presence shows."""

    name: str
    config: str
    module: str | None = None  # as in /proc/modules: underscores
    filesystem: str | None = None  # as in /proc/filesystems
    misc: str | None = None  # as in /proc/misc
    optional: str | None = None  # why its absence is only a warning

    @property
    def needed_for(self) -> tuple[str, ...]:
        return () if self.optional else (OVERLAY,)


FEATURES = (
    Feature("loop", "CONFIG_BLK_DEV_LOOP", module="loop", misc="loop-control"),
    Feature("squashfs", "CONFIG_SQUASHFS", module="squashfs", filesystem="squashfs"),
    Feature("ext4", "CONFIG_EXT4_FS", module="ext4", filesystem="ext4"),
    Feature("tmpfs", "CONFIG_TMPFS", filesystem="tmpfs"),
    Feature("overlay", "CONFIG_OVERLAY_FS", module="overlay", filesystem="overlay",
            optional="only for rd.live.overlay.overlayfs"),
    Feature("dm-mod", "CONFIG_BLK_DEV_DM", module="dm_mod", misc="device-mapper"),
    Feature("dm-snapshot", "CONFIG_DM_SNAPSHOT", module="dm_snapshot"),
    Feature("dm-thin-pool", "CONFIG_DM_THIN_PROVISIONING", module="dm_thin_pool",
            optional="only for the thin overlay (rd.live.overlay.thin)"),
)

DM_FEATURES = frozenset({"dm-mod", "dm-snapshot", "dm-thin-pool"})


@dataclass(frozen=True)
class SystemPaths:
    """Where the probes look; tests point these at synthetic trees."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    modules: Path = Path("/lib/modules")
    dev: Path = Path("/dev")


@dataclass(frozen=True)
class KernelState:
    """What the kernel shows of itself.  None: that source could not be read
    (no /proc/modules means a kernel without loadable modules)."""

    release: str
    filesystems: frozenset[str] | None
    misc: frozenset[str] | None
    loaded: frozenset[str] | None  # /proc/modules
    sys_modules: frozenset[str] | None  # /sys/module
    builtin: frozenset[str] | None  # modules.builtin
    on_disk: frozenset[str] | None  # modules.dep
    dm_control: bool  # /dev/mapper/control exists


def _lines(path: Path) -> list[str] | None:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return None


def _column(lines: list[str] | None, index: int) -> frozenset[str] | None:
    """One whitespace-separated column (negative: from the end) of each line."""
    if lines is None:
        return None
    need = index + 1 if index >= 0 else -index
    return frozenset(f[index] for f in (line.split() for line in lines) if len(f) >= need)


def module_name(path: str) -> str:
    """kernel/drivers/md/dm-snapshot.ko.xz -> dm_snapshot, the name the kernel
    uses in /proc/modules and /sys/module."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _modules_listed(path: Path, *, dep: bool) -> frozenset[str] | None:
    lines = _lines(path)
    if lines is None:
        return None
    # modules.dep lines are "module.ko: deps..."; modules.builtin lines are paths.
    paths = (line.split(":", 1)[0] if dep else line for line in lines)
    return frozenset(module_name(p.strip()) for p in paths if p.strip())


def _listdir(path: Path) -> frozenset[str] | None:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return None


def read_kernel_state(paths: SystemPaths = SystemPaths(), *,
                      release: str | None = None) -> KernelState:
    """Read the files the decisions rest on; plain reads, nothing that blocks."""
    release = release or os.uname().release
    moddir = paths.modules / release
    return KernelState(
        release=release,
        filesystems=_column(_lines(paths.proc / "filesystems"), -1),
        misc=_column(_lines(paths.proc / "misc"), 1),
        loaded=_column(_lines(paths.proc / "modules"), 0),
        sys_modules=_listdir(paths.sys / "module"),
        builtin=_modules_listed(moddir / "modules.builtin", dep=False),
        on_disk=_modules_listed(moddir / "modules.dep", dep=True),
        dm_control=os.path.exists(paths.dev / "mapper" / "control"),
    )


def _has(found: frozenset[str] | None, name: str | None) -> bool:
    return name is not None and found is not None and name in found


def _where_active(feature: Feature, state: KernelState) -> str | None:
    """How the running kernel shows the feature, or None when it does not."""
    if _has(state.loaded, feature.module):
        return "loaded module"
    if _has(state.builtin, feature.module):
        return "built into the kernel"
    if _has(state.filesystems, feature.filesystem):
        return "in /proc/filesystems"
    if _has(state.misc, feature.misc):
        return "in /proc/misc"
    if _has(state.sys_modules, feature.module):
        return "in /sys/module"
    return None


def _missing_hint(feature: Feature) -> str:
    if feature.module:
        hint = (f"boot a kernel built with {feature.config}=y, or =m and then load it: "
                f"modprobe {feature.name}")
    else:
        hint = f"boot a kernel built with {feature.config}=y"
    if feature.name in DM_FEATURES:
        hint += f"; on a machine without it, {VMTEST}"
    return hint


def _why_missing(feature: Feature, state: KernelState) -> str:
    reasons = ["not in the running kernel"]
    if feature.module is not None:
        if state.on_disk is None:
            reasons.append(f"no /lib/modules/{state.release}/modules.dep")
        else:
            reasons.append("no module on disk")
        if state.loaded is None:
            reasons.append("no /proc/modules (a kernel without loadable modules?)")
    if feature.optional:
        reasons.append(feature.optional)
    return "; ".join(reasons)


def feature_check(feature: Feature, state: KernelState) -> Check:
    """Present, loadable, unknown or missing, decided from a KernelState alone."""
    def check(status: Status, detail: str, hint: str | None = None) -> Check:
        return Check(feature.name, Category.KERNEL, status, detail, hint, feature.needed_for)

    where = _where_active(feature, state)
    if where:
        return check(Status.OK, where)
    if _has(state.on_disk, feature.module):
        return check(Status.OK, f"loadable: not loaded, module on disk (modprobe {feature.name})",
                     f"load it now: modprobe {feature.name} (as root)")
    if state.filesystems is None and state.misc is None and state.sys_modules is None:
        return check(Status.WARN, "cannot tell: /proc and /sys are not readable",
                     "run doctor where /proc and /sys are mounted")
    status = Status.WARN if feature.optional else Status.MISSING
    return check(status, _why_missing(feature, state), _missing_hint(feature))


def dm_control_check(state: KernelState, dm_mod: Check) -> Check:
    name = "/dev/mapper/control"
    if state.dm_control and dm_mod.ok:
        return Check(name, Category.KERNEL, Status.OK, "present", None, (OVERLAY,))
    if dm_mod.ok:
        return Check(name, Category.KERNEL, Status.WARN,
                     "device-mapper is available but its control node is missing",
                     "create it: dmsetup mknodes (as root), or load dm-mod so udev makes it",
                     (OVERLAY,))
    if state.dm_control:
        # libdevmapper makes this node itself on its first call, even when the
        # kernel has no device-mapper: it then leads nowhere.
        return Check(name, Category.KERNEL, Status.WARN,
                     "the node exists, but the kernel has no device-mapper behind it",
                     dm_mod.hint, (OVERLAY,))
    return Check(name, Category.KERNEL, Status.MISSING, "no device-mapper in this kernel",
                 dm_mod.hint, (OVERLAY,))


def kernel_checks(state: KernelState, features: Iterable[Feature] = FEATURES) -> list[Check]:
    checks = [feature_check(f, state) for f in features]
    dm_mod = next((c for c in checks if c.name == "dm-mod"), None)
    if dm_mod is not None:
        checks.append(dm_control_check(state, dm_mod))
    return checks


# ---------------------------------------------------------------- privileges

def privilege_checks(euid: int, *, fuse_device: str = FUSE_DEVICE) -> list[Check]:
    if euid == 0:
        return [Check("root", Category.PRIVILEGES, Status.OK, "running as root", None,
                      (OVERLAY,)),
                Check(fuse_device, Category.PRIVILEGES, Status.OK,
                      "not needed: root reads images through the kernel", None,
                      (IMAGES_AS_USER,))]
    return [Check("root", Category.PRIVILEGES, Status.WARN,
                  f"running as uid {euid}: build works, loop and device-mapper setup do not",
                  "run the overlay setup as root (sudo)", (OVERLAY,)),
            fuse_check(fuse_device)]


def fuse_check(fuse_device: str = FUSE_DEVICE) -> Check:
    """Whether this user may mount with FUSE: mkupdates reads an ext image so."""
    if os.access(fuse_device, os.R_OK | os.W_OK):
        return Check(fuse_device, Category.PRIVILEGES, Status.OK, "this user may open it",
                     None, (IMAGES_AS_USER,))
    why = "not this user's" if os.path.exists(fuse_device) else "missing"
    return Check(fuse_device, Category.PRIVILEGES, Status.WARN,
                 f"{why}: mkupdates reads images only as root",
                 "udev makes it 0666; a container needs it passed in (--device /dev/fuse)",
                 (IMAGES_AS_USER,))


# ---------------------------------------------------------------- all

def diagnose(*, paths: SystemPaths = SystemPaths(), release: str | None = None,
             euid: int | None = None, search_path: str | None = None) -> Report:
    """Every check, in the order they are shown."""
    state = read_kernel_state(paths, release=release)
    checks = [
        *tool_checks(search_path=search_path),
        *python_checks(),
        *blockdev_checks(search_path=search_path),
        *kernel_checks(state),
        *privilege_checks(os.geteuid() if euid is None else euid),
    ]
    return Report(tuple(checks), state.release)


def verdicts(report: Report) -> list[str]:
    """One line per job: ready, or what stands in its way."""
    lines = []
    for purpose in PURPOSES:
        blocking = report.blocking(purpose)
        if not blocking:
            lines.append(f"{purpose}: ready")
        else:
            names = ", ".join(c.name for c in blocking)
            lines.append(f"{purpose}: not ready ({names})")
    missing = _dm_missing(report)
    if missing:
        lines.append(f"{missing}: images can be built here, but the overlay cannot be set "
                     f"up; {VMTEST}")
    return lines


def _dm_missing(report: Report) -> str | None:
    by_name = {c.name: c for c in report.checks}
    if "dm-mod" in by_name and not by_name["dm-mod"].ok:
        return "device-mapper is missing from this kernel"
    if "dm-snapshot" in by_name and not by_name["dm-snapshot"].ok:
        return "device-mapper's snapshot target is missing from this kernel"
    return None


def format_text(report: Report) -> str:
    """The report for people: grouped by category, aligned, hints under their
    check, then a summary and one line per job."""
    width = max((len(c.name) for c in report.checks), default=0)
    lines = [f"kernel {report.kernel}"]
    for category in Category:
        checks = [c for c in report.checks if c.category is category]
        if not checks:
            continue
        lines += ["", category.value]
        for c in checks:
            lines.append(f"  {c.status.value:<8} {c.name:<{width}}  {c.detail}")
            if c.hint and not c.ok:
                lines.append(f"  {'':<8} {'':<{width}}  fix: {c.hint}")
    counts = ", ".join(f"{report.count(s)} {s.value}" for s in Status)
    lines += ["", counts, *verdicts(report)]
    return "\n".join(lines)
