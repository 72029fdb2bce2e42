"""The libblockdev backend of `blockdev`, and the one place that imports
libblockdev (gi.repository.BlockDev).

Works with the 3.0 API (Fedora, Debian 13) and the 2.0 API (Debian 12).
libblockdev is initialised once per process, and only with the plugins a
caller asks for; plugins asked for later are added without reloading the
ones already in use.  Every GLib.Error becomes a BlockDevError with a hint.
The operations take what `blockdev` has checked: a file path, a bare loop
device name (loop0); the backing-file guard on detach is blockdev's.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from dmoverlay.core.errors import BlockDevError, UsageError

# The plugins dmoverlay uses, in the order doctor reports them.  Not dm:
# device-mapper tables go through dmsetup, as libblockdev's dm plugin cannot
# create snapshot (or thin) targets.
PLUGINS = ("loop", "fs")

# Newest first: a machine with both typelibs gets the current API.
API_VERSIONS = ("3.0", "2.0")

# BD_LOOP_ERROR_DEVICE in libblockdev 3.x loop.h: "no such device" or, from
# LOOP_GET_STATUS64, ENXIO: a loop device with nothing attached.
_LOOP_ERROR_DEVICE = 2

PROVISION = "or run scripts/provision"


@dataclass(frozen=True)
class Binding:
    """The imported BlockDev module and the API version it was loaded as."""

    module: ModuleType
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def so_name(plugin: str, version: str) -> str:
    """The shared object libblockdev loads for a plugin: libbd_loop.so.2 for 2.0."""
    return f"libbd_{plugin}.so.{version.split('.')[0]}"


def plugin_packages(plugin: str, version: str) -> tuple[str, str]:
    """(Debian package, Fedora package) that ship a plugin."""
    return f"libblockdev-{plugin}{version.split('.')[0]}", f"libblockdev-{plugin}"


def gi_packages(version: str) -> tuple[str, str]:
    """(Debian packages, Fedora packages) for the GObject binding itself."""
    return f"python3-gi gir1.2-blockdev-{version} python3-blockdev", "python3-blockdev"


def _import_hint() -> str:
    debian, fedora = gi_packages("2.0")
    return (f"install it: apt-get install {debian} (Debian 12), dnf install {fedora} "
            f"(Fedora), {PROVISION}")


def _plugin_hint(plugin: str, version: str) -> str:
    debian, fedora = plugin_packages(plugin, version)
    return (f"install it: apt-get install {debian} (Debian), dnf install {fedora} (Fedora), "
            f"{PROVISION}")


def find_binding(namespace: str = "BlockDev",
                 versions: tuple[str, ...] = API_VERSIONS) -> Binding | None:
    """Import the newest available version of a GObject namespace, or None.

    gi allows one version per namespace and process: when someone already
    required one, that is the one we get."""
    try:
        import gi
    except ImportError:
        return None
    loaded = gi.get_required_version(namespace)
    for version in (loaded,) if loaded else versions:
        try:
            gi.require_version(namespace, version)
            module = importlib.import_module(f"gi.repository.{namespace}")
        except (ImportError, ValueError):
            continue
        return Binding(module, version)
    return None


@cache
def _binding() -> Binding | None:
    binding = find_binding()
    if binding is not None and hasattr(binding.module, "switch_init_checks"):
        # libblockdev 2.x refuses to load the fs plugin unless the tools for
        # every filesystem it knows (xfs, vfat, ntfs) are installed; with init
        # checks off, each function checks its own tools when called (what
        # blivet does).  3.x checks lazily anyway and has no such switch.
        binding.module.switch_init_checks(False)
    return binding


def api_version() -> str | None:
    """"3.0" or "2.0", or None when gi or the BlockDev typelib is missing."""
    binding = _binding()
    return binding.version if binding else None


def _require_binding() -> Binding:
    binding = _binding()
    if binding is None:
        raise BlockDevError("libblockdev's Python binding (gi.repository.BlockDev) is not "
                            "installed", hint=_import_hint())
    return binding


def _plugin_enum(binding: Binding, plugin: str) -> Any:
    value = getattr(binding.module.Plugin, plugin.upper(), None) if plugin.isalnum() else None
    if value is None:
        raise UsageError(f"libblockdev has no plugin named {plugin!r}")
    return value


def _check_shared_object(binding: Binding, plugin: str) -> None:
    # Asking libblockdev to load a plugin that is not installed only says
    # "Failed to load plugins" and prints GLib warnings on stderr; dlopen
    # says which file is missing, and quietly.
    name = so_name(plugin, binding.version)
    try:
        ctypes.CDLL(name)
    except OSError as exc:
        raise BlockDevError(f"libblockdev's {plugin} plugin cannot be loaded: {exc}",
                            hint=_plugin_hint(plugin, binding.version)) from None


def _spec(binding: Binding, plugin: str) -> Any:
    # PluginSpec(name=..., so_name=...) silently ignores its arguments
    # (PyGObject deprecates arguments to boxed constructors): set fields.
    spec = binding.module.PluginSpec()
    spec.name = _plugin_enum(binding, plugin)
    spec.so_name = so_name(plugin, binding.version)
    return spec


def load(*plugins: str) -> ModuleType:
    """The BlockDev module, initialised with at least these plugins."""
    binding = _require_binding()
    bd = binding.module
    wanted = [p for p in plugins if not bd.is_plugin_available(_plugin_enum(binding, p))]
    if not wanted:
        return bd
    for plugin in wanted:
        _check_shared_object(binding, plugin)
    from gi.repository import GLib

    try:
        # ensure_init loads only what is not loaded yet, and keeps the rest.
        with _parted_handler_kept():
            ok = bd.ensure_init([_spec(binding, p) for p in wanted], None)
    except GLib.Error as exc:
        ok, reason = False, exc.message
    else:
        reason = "libblockdev reported a failure"
    failed = [p for p in wanted if not bd.is_plugin_available(_plugin_enum(binding, p))]
    if failed or not ok:
        names = ", ".join(failed or wanted)
        raise BlockDevError(f"libblockdev could not load the {names} plugin: {reason}",
                            hint=_plugin_hint((failed or wanted)[0], binding.version))
    return bd


@contextmanager
def _parted_handler_kept() -> Iterator[None]:
    """libblockdev 2.x's fs plugin installs its own libparted exception
    handler when it initialises; pyparted, in the same process, then crashes
    (SIGSEGV) on the next libparted exception, e.g. reading a truncated disk.
    Put back whatever handler was in place."""
    try:
        libparted = ctypes.CDLL("libparted.so.2")
    except OSError:  # no libparted: nothing to protect
        yield
        return
    libparted.ped_exception_get_handler.restype = ctypes.c_void_p
    libparted.ped_exception_set_handler.argtypes = [ctypes.c_void_p]
    before = libparted.ped_exception_get_handler()
    try:
        yield
    finally:
        libparted.ped_exception_set_handler(before)


def plugin_status() -> dict[str, bool]:
    """Which of dmoverlay's plugins load on this machine."""
    status = {}
    for plugin in PLUGINS:
        try:
            load(plugin)
        except BlockDevError:
            status[plugin] = False
        else:
            status[plugin] = True
    return status


def problem() -> BlockDevError | None:
    """Why this backend cannot serve here (binding or a plugin missing), or
    None when every plugin dmoverlay uses loads."""
    try:
        load(*PLUGINS)
    except BlockDevError as exc:
        return exc
    return None


# The operations.  We return a loop device as its path, which is what mount,
# dmsetup and the kernel's tables take.

def _error(exc: Exception, message: str, hint: str | None = None) -> BlockDevError:
    detail = getattr(exc, "message", None) or str(exc)
    return BlockDevError(f"{message}: {detail}", hint=hint)


def _root_hint() -> str | None:
    return None if os.geteuid() == 0 else "loop devices need root: run it with sudo"


def loop_setup(file: str, *, read_only: bool, offset: int, size: int, part_scan: bool) -> str:
    bd = load("loop")
    from gi.repository import GLib

    # bd_loop_setup opens the file read-write even for a read-only device,
    # which fails on read-only media (a file inside a mounted squashfs): open
    # it ourselves, as the device will use it.
    try:
        fd = os.open(file, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise BlockDevError(f"cannot attach {file} to a loop device: {exc.strerror}",
                            hint=_root_hint()) from None
    try:
        # 3.x added sector_size (0: the default) before the out argument.
        if _require_binding().major >= 3:
            ok, name = bd.loop_setup_from_fd(fd, offset, size, read_only, part_scan, 0)
        else:
            ok, name = bd.loop_setup_from_fd(fd, offset, size, read_only, part_scan)
    except GLib.Error as exc:
        raise _error(exc, f"cannot attach {file} to a loop device", _root_hint()) from None
    finally:
        os.close(fd)  # the loop device holds its own reference
    if not ok or not name:
        raise BlockDevError(f"cannot attach {file} to a loop device", hint=_root_hint())
    return f"/dev/{name}"


def loop_get_backing(name: str) -> str | None:
    bd = load("loop")
    from gi.repository import GLib

    try:
        backing: str | None
        if hasattr(bd, "loop_get_backing_file"):
            backing = bd.loop_get_backing_file(name)
        else:
            # 3.x replaced get_backing_file with loop_info, which wants the
            # bare name (it reads /sys/class/block/<name>/loop/backing_file).
            backing = bd.loop_info(name).backing_file
    except GLib.Error as exc:
        if exc.domain == GLib.quark_to_string(bd.loop_error_quark()) and \
                exc.code == _LOOP_ERROR_DEVICE:
            return None
        raise _error(exc, f"cannot query loop device {name}") from None
    return backing or None


def loop_detach(name: str) -> None:
    bd = load("loop")
    from gi.repository import GLib

    try:
        ok = bd.loop_teardown(name)
    except GLib.Error as exc:
        raise _error(exc, f"cannot detach loop device {name}", _root_hint()) from None
    if not ok:
        raise BlockDevError(f"cannot detach loop device {name}", hint=_root_hint())


# Mounts.  libblockdev's fs plugin mounts through libmount, as mount(8) does.

def mount(device: str, where: str, *, fstype: str, options: str) -> None:
    bd = load("fs")
    from gi.repository import GLib

    try:
        bd.fs_mount(device, where, fstype, options or None, None)
    except GLib.Error as exc:
        raise _error(exc, f"cannot mount {device} ({fstype}) on {where}", _root_hint()) from None


def unmount(where: str, *, lazy: bool) -> None:
    bd = load("fs")
    from gi.repository import GLib

    try:
        bd.fs_unmount(where, lazy, False, None)
    except GLib.Error as exc:
        raise _error(exc, f"cannot unmount {where}") from None
