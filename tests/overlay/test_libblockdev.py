"""libblockdev's own side of its backend: the real library and its real
failures (a missing namespace, a plugin not installed, libparted's handler).
What it does with loop devices and mounts is tested with the util-linux
backend's, in test_blockdev."""

from __future__ import annotations

import ast
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmoverlay.core.errors import BlockDevError, UsageError
from dmoverlay.overlay import libblockdev

# libblockdev plugins dmoverlay never uses, so most machines lack some of them.
OTHER_PLUGINS = ("lvm", "btrfs", "mdraid", "mpath", "crypto", "swap", "kbd", "nvdimm", "vdo")


def test_so_name_follows_the_api_major_version() -> None:
    assert libblockdev.so_name("loop", "2.0") == "libbd_loop.so.2"
    assert libblockdev.so_name("dm", "3.0") == "libbd_dm.so.3"


def test_plugin_packages_name_debian_and_fedora() -> None:
    assert libblockdev.plugin_packages("loop", "2.0") == ("libblockdev-loop2", "libblockdev-loop")
    assert libblockdev.plugin_packages("part", "3.0") == ("libblockdev-part3", "libblockdev-part")


def test_find_binding_returns_none_for_an_absent_namespace() -> None:
    assert libblockdev.find_binding("NoSuchNamespaceForDmoverlay") is None


def test_api_version_is_the_one_gi_loaded() -> None:
    import gi

    version = libblockdev.api_version()
    assert version in libblockdev.API_VERSIONS
    assert gi.get_required_version("BlockDev") == version


def test_load_initialises_the_plugin() -> None:
    bd = libblockdev.load("loop")
    assert bd.is_plugin_available(bd.Plugin.LOOP)
    assert libblockdev.load("loop") is bd


def test_every_plugin_dmoverlay_uses_loads() -> None:
    # fs is the one libblockdev 2.x refuses without xfs, vfat and ntfs tools,
    # unless its init checks are switched off.
    assert libblockdev.plugin_status() == dict.fromkeys(libblockdev.PLUGINS, True)


def test_the_plugins_checked_are_those_the_code_loads() -> None:
    """doctor checks PLUGINS: every plugin some call loads, and no other (the
    dm plugin was checked, and a blocker when missing, but never called)."""
    loaded = set()
    for path in Path(libblockdev.__file__).parents[1].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                    node.func, "attr", "")) == "load" and node.args \
                    and isinstance(node.args[0], ast.Constant):  # not doctor's loop over PLUGINS
                loaded.add(node.args[0].value)
    assert loaded == set(libblockdev.PLUGINS) == {"loop", "fs"}


@pytest.mark.parametrize("name", ["nope", "", "loop;rm"])
def test_load_rejects_unknown_plugin_names(name: str) -> None:
    with pytest.raises(UsageError, match="no plugin named"):
        libblockdev.load(name)


def _not_installed_plugin() -> str:
    version = libblockdev.api_version()
    assert version is not None
    for plugin in OTHER_PLUGINS:
        try:
            ctypes.CDLL(libblockdev.so_name(plugin, version))
        except OSError:
            return plugin
    pytest.skip("every libblockdev plugin is installed here")


def test_load_names_the_missing_plugin_and_its_package() -> None:
    plugin = _not_installed_plugin()
    version = libblockdev.api_version()
    assert version is not None
    with pytest.raises(BlockDevError) as caught:
        libblockdev.load(plugin)
    assert libblockdev.so_name(plugin, version) in caught.value.message
    assert caught.value.hint is not None
    debian, fedora = libblockdev.plugin_packages(plugin, version)
    assert f"apt-get install {debian}" in caught.value.hint
    assert f"dnf install {fedora}" in caught.value.hint


def test_a_failed_load_keeps_the_loaded_plugins() -> None:
    bd = libblockdev.load("loop")
    with pytest.raises(BlockDevError):
        libblockdev.load(_not_installed_plugin())
    assert bd.is_plugin_available(bd.Plugin.LOOP)


def test_pyparted_survives_the_fs_plugin(tmp_path: Path) -> None:
    """libblockdev 2.x's fs plugin replaces libparted's exception handler;
    pyparted then crashed on the next libparted exception.  In a child
    process, so a regression cannot take the test run down with it."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\n,1M\n", text=True,
                   check=True, capture_output=True)
    os.truncate(disk, 4 << 20)  # the backup table is gone: libparted raises
    probe = (
        "import sys, parted\n"
        "from dmoverlay.overlay import libblockdev\n"
        "libblockdev.load('fs')\n"
        f"try:\n    parted.newDisk(parted.getDevice({str(disk)!r}))\n"
        "except Exception as exc:\n    print('raised', type(exc).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f"child died: {result.returncode} {result.stderr}"
