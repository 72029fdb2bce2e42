"""libblockdev through dmoverlay.overlay.blockdev: the real library, real loop devices
(as root), and real failures: a missing namespace, a plugin not installed, a
file that does not exist, a loop device with nothing attached."""

from __future__ import annotations

import ast
import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.core.errors import BlockDevError, UsageError
from dmoverlay.overlay import blockdev

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")

# libblockdev plugins dmoverlay never uses, so most machines lack some of them.
OTHER_PLUGINS = ("lvm", "btrfs", "mdraid", "mpath", "crypto", "swap", "kbd", "nvdimm", "vdo")


def test_so_name_follows_the_api_major_version() -> None:
    assert blockdev.so_name("loop", "2.0") == "libbd_loop.so.2"
    assert blockdev.so_name("dm", "3.0") == "libbd_dm.so.3"


def test_plugin_packages_name_debian_and_fedora() -> None:
    assert blockdev.plugin_packages("loop", "2.0") == ("libblockdev-loop2", "libblockdev-loop")
    assert blockdev.plugin_packages("part", "3.0") == ("libblockdev-part3", "libblockdev-part")


def test_find_binding_returns_none_for_an_absent_namespace() -> None:
    assert blockdev.find_binding("NoSuchNamespaceForDmoverlay") is None


def test_api_version_is_the_one_gi_loaded() -> None:
    import gi

    version = blockdev.api_version()
    assert version in blockdev.API_VERSIONS
    assert gi.get_required_version("BlockDev") == version


def test_load_initialises_the_plugin() -> None:
    bd = blockdev.load("loop")
    assert bd.is_plugin_available(bd.Plugin.LOOP)
    assert blockdev.load("loop") is bd


def test_every_plugin_dmoverlay_uses_loads() -> None:
    # fs is the one libblockdev 2.x refuses without xfs, vfat and ntfs tools,
    # unless its init checks are switched off.
    assert blockdev.plugin_status() == dict.fromkeys(blockdev.PLUGINS, True)


def test_the_plugins_checked_are_those_the_code_loads() -> None:
    """doctor checks PLUGINS: every plugin some call loads, and no other (the
    dm plugin was checked, and a blocker when missing, but never called)."""
    loaded = set()
    for path in Path(blockdev.__file__).parents[1].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                    node.func, "attr", "")) == "load" and node.args \
                    and isinstance(node.args[0], ast.Constant):  # not doctor's loop over PLUGINS
                loaded.add(node.args[0].value)
    assert loaded == set(blockdev.PLUGINS) == {"loop", "fs"}


@pytest.mark.parametrize("name", ["nope", "", "loop;rm"])
def test_load_rejects_unknown_plugin_names(name: str) -> None:
    with pytest.raises(UsageError, match="no plugin named"):
        blockdev.load(name)


def _not_installed_plugin() -> str:
    version = blockdev.api_version()
    assert version is not None
    for plugin in OTHER_PLUGINS:
        try:
            ctypes.CDLL(blockdev.so_name(plugin, version))
        except OSError:
            return plugin
    pytest.skip("every libblockdev plugin is installed here")


def test_load_names_the_missing_plugin_and_its_package() -> None:
    plugin = _not_installed_plugin()
    version = blockdev.api_version()
    assert version is not None
    with pytest.raises(BlockDevError) as caught:
        blockdev.load(plugin)
    assert blockdev.so_name(plugin, version) in caught.value.message
    assert caught.value.hint is not None
    debian, fedora = blockdev.plugin_packages(plugin, version)
    assert f"apt-get install {debian}" in caught.value.hint
    assert f"dnf install {fedora}" in caught.value.hint


def test_a_failed_load_keeps_the_loaded_plugins() -> None:
    bd = blockdev.load("loop")
    with pytest.raises(BlockDevError):
        blockdev.load(_not_installed_plugin())
    assert bd.is_plugin_available(bd.Plugin.LOOP)


def test_backing_of_a_device_that_does_not_exist_is_none() -> None:
    assert blockdev.loop_get_backing("loop987654") is None
    assert blockdev.loop_get_backing("/dev/loop987654") is None


def test_setup_of_a_missing_file_is_one_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.img"
    with pytest.raises(BlockDevError, match=r"absent\.img"):
        blockdev.loop_setup(missing, read_only=True)


def test_negative_offset_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        blockdev.loop_setup(tmp_path / "x.img", read_only=True, offset=-1)


class Attached:
    """Loop devices a test attaches, detached afterwards even if it failed."""

    def __init__(self) -> None:
        self.devices: list[tuple[str, Path]] = []

    def setup(self, image: Path, *, read_only: bool, offset: int = 0, size: int = 0) -> str:
        dev = blockdev.loop_setup(image, read_only=read_only, offset=offset, size=size)
        self.devices.append((dev, image))
        return dev


@pytest.fixture
def attached() -> Iterator[Attached]:
    loops = Attached()
    yield loops
    for dev, image in reversed(loops.devices):
        blockdev.loop_teardown(dev, backing=image)


def _sys(dev: str, attr: str) -> str:
    return Path("/sys/class/block", os.path.basename(dev), attr).read_text().strip()


def _image(tmp_path: Path, size: int) -> Path:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * size)
    return image


@pytest.mark.root
@needs_root
def test_read_only_setup_with_offset_and_size(tmp_path: Path, attached: Attached) -> None:
    image = _image(tmp_path, 4 << 20)
    dev = attached.setup(image, read_only=True, offset=1 << 20, size=2 << 20)
    assert dev.startswith("/dev/loop")
    assert blockdev.loop_get_backing(dev) == str(image)
    assert blockdev.loop_get_backing(os.path.basename(dev)) == str(image)
    assert _sys(dev, "ro") == "1"
    assert _sys(dev, "loop/offset") == str(1 << 20)
    assert int(_sys(dev, "size")) * 512 == 2 << 20
    with pytest.raises(OSError), open(dev, "r+b") as f:
        f.write(b"x")


@pytest.mark.root
@needs_root
def test_writes_through_the_device_land_at_the_offset(tmp_path: Path,
                                                      attached: Attached) -> None:
    image = _image(tmp_path, 1 << 20)
    dev = attached.setup(image, read_only=False, offset=4096)
    assert _sys(dev, "ro") == "0"
    with open(dev, "r+b") as f:
        f.write(b"dmoverlay")
        f.flush()
        os.fsync(f.fileno())
    blockdev.loop_teardown(dev)
    assert image.read_bytes()[4096:4105] == b"dmoverlay"


@pytest.mark.root
@needs_root
def test_teardown_with_backing_is_safe_to_repeat(tmp_path: Path, attached: Attached) -> None:
    image = _image(tmp_path, 1 << 20)
    dev = attached.setup(image, read_only=True)
    blockdev.loop_teardown(dev, backing=image)
    assert blockdev.loop_get_backing(dev) is None
    # Again: the device no longer holds the image, so this must not touch it.
    blockdev.loop_teardown(dev, backing=image)


@pytest.mark.root
@needs_root
def test_teardown_with_backing_leaves_other_files_attached(tmp_path: Path,
                                                           attached: Attached) -> None:
    image = _image(tmp_path, 1 << 20)
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * (1 << 20))
    dev = attached.setup(image, read_only=True)
    blockdev.loop_teardown(dev, backing=other)
    assert blockdev.loop_get_backing(dev) == str(image)


def test_teardown_of_a_device_that_does_not_exist_is_one_error() -> None:
    with pytest.raises(BlockDevError, match="loop987654"):
        blockdev.loop_teardown("/dev/loop987654")


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
        "from dmoverlay.overlay import blockdev\n"
        "blockdev.load('fs')\n"
        f"try:\n    parted.newDisk(parted.getDevice({str(disk)!r}))\n"
        "except Exception as exc:\n    print('raised', type(exc).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f"child died: {result.returncode} {result.stderr}"
