"""Loop devices and mounts through dmoverlay.overlay.blockdev, each test run
against both backends (libblockdev where it loads, and util-linux), so that
the two are held to the same behaviour: real loop devices on real files,
real ext4 and tmpfs mounts (as root), and real failures.  Then the choice
between them, and what the util-linux backend does on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.core.errors import BlockDevError, UsageError
from dmoverlay.overlay import blockdev, libblockdev, utillinux
from dmoverlay.overlay.blockdev import ENV, LIBBLOCKDEV, UTIL_LINUX
from dmoverlay.overlay.state import Step, StepKind
from tests.conftest import dmoverlay, loop_backings
from tests.overlay.statefiles import make_state, plant

LOOP_CONTROL = Path("/dev/loop-control")
needs_loop = pytest.mark.skipif(os.geteuid() != 0 or not LOOP_CONTROL.exists(),
                                reason="loop devices need root and /dev/loop-control")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _unavailable(name: str) -> str | None:
    if name == LIBBLOCKDEV:
        problem = libblockdev.problem()
        return problem.message if problem else None
    missing = utillinux.missing_tools()
    return f"{', '.join(missing)} not found" if missing else None


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The per-process choice made again in this test, and forgotten after."""
    monkeypatch.delenv(ENV, raising=False)
    blockdev.backend.cache_clear()
    yield monkeypatch
    blockdev.backend.cache_clear()


@pytest.fixture(params=blockdev.BACKENDS)
def backend(request: pytest.FixtureRequest, fresh_choice: pytest.MonkeyPatch) -> str:
    """Each backend in turn, forced as DMOVERLAY_BLOCKDEV forces it."""
    name: str = request.param
    why = _unavailable(name)
    if why:
        pytest.skip(f"{name} cannot be used here: {why}")
    fresh_choice.setenv(ENV, name)
    assert blockdev.backend_name() == name
    return name


class Attached:
    """Loop devices a test attaches, detached afterwards even if it failed."""

    def __init__(self) -> None:
        self.devices: list[tuple[str, Path]] = []

    def setup(self, image: Path, *, read_only: bool, offset: int = 0, size: int = 0) -> str:
        dev = blockdev.loop_setup(image, read_only=read_only, offset=offset, size=size)
        self.devices.append((dev, image))
        return dev


@pytest.fixture
def attached(backend: str) -> Iterator[Attached]:
    loops = Attached()
    yield loops
    for dev, image in reversed(loops.devices):
        blockdev.loop_teardown(dev, backing=image)


def _sys(dev: str, attr: str) -> str:
    return Path("/sys/class/block", os.path.basename(dev), attr).read_text().strip()


def _image(tmp_path: Path, size: int, name: str = "disk.img") -> Path:
    image = tmp_path / name
    image.write_bytes(b"\0" * size)
    return image


def _loops_holding(image: Path) -> list[str]:
    return [name for name, backing in loop_backings().items() if backing == str(image)]


def _mounted(where: Path) -> list[list[str]]:
    """The /proc/self/mounts entries at `where`: [source, target, fstype, options, ...]."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [fields for fields in (line.split() for line in lines) if fields[1] == str(where)]


def _one_line(exc: BlockDevError) -> str:
    assert "\n" not in exc.message and exc.message.isprintable(), exc.message
    return exc.message


# ---------------------------------------------------------------- loop devices, both backends

def test_backing_of_a_device_that_does_not_exist_is_none(backend: str) -> None:
    assert blockdev.loop_get_backing("loop987654") is None
    assert blockdev.loop_get_backing("/dev/loop987654") is None


def test_setup_of_a_missing_file_is_one_error(backend: str, tmp_path: Path) -> None:
    missing = tmp_path / "absent.img"
    with pytest.raises(BlockDevError, match=r"absent\.img") as caught:
        blockdev.loop_setup(missing, read_only=True)
    assert "No such file or directory" in _one_line(caught.value)


def test_negative_offset_is_a_usage_error(backend: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        blockdev.loop_setup(tmp_path / "x.img", read_only=True, offset=-1)


def test_teardown_of_a_device_that_does_not_exist_is_one_error(backend: str) -> None:
    with pytest.raises(BlockDevError, match="loop987654") as caught:
        blockdev.loop_teardown("/dev/loop987654")
    _one_line(caught.value)


@pytest.mark.root
@needs_loop
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
@needs_loop
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
@needs_loop
def test_teardown_with_backing_is_safe_to_repeat(tmp_path: Path, attached: Attached) -> None:
    image = _image(tmp_path, 1 << 20)
    dev = attached.setup(image, read_only=True)
    blockdev.loop_teardown(dev, backing=image)
    assert blockdev.loop_get_backing(dev) is None
    # Again: the device no longer holds the image, so this must not touch it.
    blockdev.loop_teardown(dev, backing=image)


@pytest.mark.root
@needs_loop
def test_teardown_with_backing_leaves_other_files_attached(tmp_path: Path,
                                                           attached: Attached) -> None:
    image = _image(tmp_path, 1 << 20)
    other = _image(tmp_path, 1 << 20, "other.img")
    dev = attached.setup(image, read_only=True)
    blockdev.loop_teardown(dev, backing=other)
    assert blockdev.loop_get_backing(dev) == str(image)


@pytest.fixture
def read_only_media(tmp_path: Path) -> Iterator[Path]:
    """A file on a filesystem mounted read-only, as rootfs.img sits in a
    mounted squashfs: opening it for writing fails even for root."""
    media = tmp_path / "media"
    media.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(media)], check=True)
    try:
        _image(media, 1 << 20, "rootfs.img")
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        yield media / "rootfs.img"
    finally:
        subprocess.run(["umount", str(media)], check=True)


@pytest.mark.root
@needs_loop
def test_a_file_on_read_only_media_attaches_read_only(read_only_media: Path,
                                                      attached: Attached) -> None:
    dev = attached.setup(read_only_media, read_only=True)
    assert _sys(dev, "ro") == "1"
    assert blockdev.loop_get_backing(dev) == str(read_only_media)


@pytest.mark.root
@needs_loop
def test_a_file_on_read_only_media_is_refused_read_write(read_only_media: Path,
                                                         attached: Attached) -> None:
    """losetup would quietly make it read-only; a COW store that cannot be
    written must be refused at attach, and nothing left attached."""
    with pytest.raises(BlockDevError, match=r"rootfs\.img") as caught:
        attached.setup(read_only_media, read_only=False)
    _one_line(caught.value)
    assert _loops_holding(read_only_media) == []


# ---------------------------------------------------------------- mounts, both backends

@pytest.fixture(scope="session")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ext4 filesystem holding /hello, made without mounting it."""
    tree = tmp_path_factory.mktemp("tree")
    (tree / "hello").write_text("from ext4\n")
    image = tmp_path_factory.mktemp("ext4") / "rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True,
                   capture_output=True)
    return image


@pytest.mark.root
@needs_loop
def test_mount_an_ext4_image_read_only(ext4_image: Path, attached: Attached,
                                       tmp_path: Path) -> None:
    dev = attached.setup(ext4_image, read_only=True)
    where = tmp_path / "root"
    where.mkdir()
    blockdev.mount(dev, where, fstype="ext4", options="ro,noload")
    try:
        assert (where / "hello").read_text() == "from ext4\n"
        [entry] = _mounted(where)
        assert entry[0] == dev and entry[2] == "ext4" and "ro" in entry[3].split(",")
    finally:
        blockdev.unmount(where)
    assert _mounted(where) == []


@pytest.mark.root
@needs_root
def test_mount_a_tmpfs_with_options_and_unmount_it_lazily(backend: str,
                                                          tmp_path: Path) -> None:
    where = tmp_path / "ram"
    where.mkdir()
    blockdev.mount("tmpfs", where, fstype="tmpfs", options="size=1m,mode=0700")
    try:
        [entry] = _mounted(where)
        assert entry[2] == "tmpfs" and "size=1024k" in entry[3] and "mode=700" in entry[3]
        busy = os.open(where, os.O_RDONLY | os.O_DIRECTORY)  # lazy: gone though in use
    finally:
        blockdev.unmount(where, lazy=True)
    os.close(busy)
    assert _mounted(where) == []


@pytest.mark.root
@needs_loop
def test_mount_with_a_wrong_filesystem_type_is_one_error(backend: str, ext4_image: Path,
                                                         attached: Attached,
                                                         tmp_path: Path) -> None:
    dev = attached.setup(ext4_image, read_only=True)
    where = tmp_path / "root"
    where.mkdir()
    with pytest.raises(BlockDevError, match=r"cannot mount .* \(squashfs\)") as caught:
        blockdev.mount(dev, where, fstype="squashfs", options="ro")
    _one_line(caught.value)
    assert _mounted(where) == []


@pytest.mark.root
@needs_root
def test_mount_of_a_filesystem_type_the_kernel_lacks_is_one_error(backend: str,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(BlockDevError, match="nosuchfs") as caught:
        blockdev.mount("none", tmp_path, fstype="nosuchfs")
    _one_line(caught.value)


@pytest.mark.root
@needs_root
def test_mount_on_a_missing_directory_is_one_error(backend: str, tmp_path: Path) -> None:
    with pytest.raises(BlockDevError, match="does not exist") as caught:
        blockdev.mount("tmpfs", tmp_path / "absent", fstype="tmpfs")
    _one_line(caught.value)


def test_unmount_of_what_is_not_mounted_is_one_error(backend: str, tmp_path: Path) -> None:
    with pytest.raises(BlockDevError, match=f"cannot unmount {tmp_path}") as caught:
        blockdev.unmount(tmp_path)
    _one_line(caught.value)


@pytest.mark.root
@needs_loop
def test_the_backends_agree_on_what_the_other_attached(tmp_path: Path,
                                                       fresh_choice: pytest.MonkeyPatch) -> None:
    for name in blockdev.BACKENDS:
        if _unavailable(name):
            pytest.skip(f"{name} cannot be used here")
    image = _image(tmp_path, 1 << 20)
    for first, second in ((libblockdev, utillinux), (utillinux, libblockdev)):
        dev = first.loop_setup(str(image), read_only=True, offset=0, size=0, part_scan=False)
        name = os.path.basename(dev)
        try:
            assert second.loop_get_backing(name) == first.loop_get_backing(name) == str(image)
        finally:
            second.loop_detach(name)
        assert first.loop_get_backing(name) is None


# ---------------------------------------------------------------- the choice

def test_the_variable_forces_a_backend(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv(ENV, UTIL_LINUX)
    assert blockdev.choose() == blockdev.Choice(UTIL_LINUX, f"set by {ENV}")
    fresh_choice.setenv(ENV, LIBBLOCKDEV)
    assert blockdev.choose().name == LIBBLOCKDEV


def test_the_choice_is_made_once_per_process(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv(ENV, UTIL_LINUX)
    assert blockdev.backend_name() == UTIL_LINUX
    fresh_choice.setenv(ENV, LIBBLOCKDEV)
    assert blockdev.backend_name() == UTIL_LINUX


@pytest.mark.parametrize("value", ["libblockdev2", "util_linux", "UTIL-LINUX", "gi", " "])
def test_a_value_naming_no_backend_is_one_usage_error(fresh_choice: pytest.MonkeyPatch,
                                                      tmp_path: Path, value: str) -> None:
    fresh_choice.setenv(ENV, value)
    with pytest.raises(UsageError, match=f"^{ENV}=.* is not a backend: use libblockdev or "
                                         "util-linux$") as caught:
        blockdev.loop_get_backing("loop0")
    assert caught.value.hint is not None and ENV in caught.value.hint


def test_an_empty_value_lets_dmoverlay_choose(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv(ENV, "")
    assert blockdev.forced() is None


def test_util_linux_with_its_tools_missing_is_one_error(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv(ENV, UTIL_LINUX)
    fresh_choice.setattr(utillinux, "find_tool", lambda tool: None if tool != "mount" else tool)
    with pytest.raises(BlockDevError, match=r"^losetup, umount not found") as caught:
        blockdev.loop_get_backing("loop0")
    assert caught.value.hint is not None
    assert "apt-get install mount" in caught.value.hint
    assert "util-linux (Fedora)" in caught.value.hint


def _child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter, where gi can be blocked before dmoverlay looks."""
    full = {k: v for k, v in os.environ.items() if k != ENV} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, check=False)


BLOCK_GI = "import sys; sys.modules['gi'] = None\n"  # `import gi` raises ImportError


def test_without_gi_util_linux_is_chosen_quietly() -> None:
    code = BLOCK_GI + ("from dmoverlay.overlay import blockdev\n"
                       "print(blockdev.backend_name(), blockdev.loop_get_backing('loop987654'))\n"
                       "print(blockdev.choose().why)\n")
    result = _child(code, {})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    name, why = result.stdout.splitlines()
    assert name == "util-linux None"
    assert why == "libblockdev's Python binding (gi.repository.BlockDev) is not installed"


def test_libblockdev_forced_without_gi_is_one_error() -> None:
    code = BLOCK_GI + ("from dmoverlay.overlay import blockdev\n"
                       "from dmoverlay.core.errors import BlockDevError\n"
                       "try:\n    blockdev.loop_get_backing('loop0')\n"
                       "except BlockDevError as exc:\n    print(exc.message); print(exc.hint)\n")
    result = _child(code, {ENV: LIBBLOCKDEV})
    assert result.returncode == 0, result.stderr
    message, hint = result.stdout.splitlines()
    assert message == "libblockdev's Python binding (gi.repository.BlockDev) is not installed"
    assert "apt-get install python3-gi" in hint


def test_debug_says_which_backend_and_why() -> None:
    code = ("from dmoverlay.overlay import blockdev\n"
            "blockdev.backend_name(); blockdev.backend_name()\n")
    result = _child(code, {ENV: UTIL_LINUX, "DMOVERLAY_DEBUG": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"# loop devices and mounts through util-linux: set by {ENV}\n"


# ---------------------------------------------------------------- util-linux on its own

@pytest.mark.parametrize("name", ["sda", "../../../etc", "loop0/../sda", "loop", "loop1p1",
                                  "loop-control", ""])
def test_util_linux_reads_sysfs_only_for_loop_device_names(name: str) -> None:
    assert utillinux.loop_get_backing(name) is None
    with pytest.raises(BlockDevError, match="not a loop device name"):
        utillinux.loop_detach(name)


@pytest.mark.parametrize(("stderr", "names", "expected"), [
    ("losetup: /x.img: failed to set up loop device: No such file or directory\n",
     ("/x.img",), "failed to set up loop device: No such file or directory"),
    ("mount: /mnt: wrong fs type, bad option.\n       dmesg(1) may have more.\n",
     ("/mnt",), "wrong fs type, bad option."),
    ("\n\nmount: /a\x1b[31m: \tred\n", (), "/a?[31m: ?red"),
    ("", (), "exit status 32"),
    ("losetup: " + "x" * 500, (), "x" * 197 + "..."),
])
def test_util_linux_keeps_the_first_line_of_stderr_cleaned(
        stderr: str, names: tuple[str, ...], expected: str) -> None:
    from dmoverlay.core.run import Result

    tool = "/usr/sbin/mount" if "mount" in stderr else "losetup"
    assert utillinux.detail(Result((tool,), 32, "", stderr), *names) == expected


@pytest.mark.root
@needs_loop
def test_teardown_through_util_linux_undoes_a_real_loop_and_mount(ext4_image: Path,
                                                                  tmp_path: Path) -> None:
    """The real CLI, as an initramfs without gi runs it, on what setup
    leaves: a loop device on the root image, mounted in its work directory."""
    state_dir = tmp_path / "state"
    work = state_dir / "live"
    where = work / "root"
    where.mkdir(parents=True, mode=0o700)
    state_dir.chmod(0o700)
    dev = utillinux.loop_setup(str(ext4_image), read_only=True, offset=0, size=0,
                               part_scan=False)
    try:
        utillinux.mount(dev, str(where), fstype="ext4", options="ro,noload")
        plant(state_dir, make_state(tmp_path, Step(StepKind.DIR, os.fspath(work)),
                                    Step(StepKind.DIR, os.fspath(where)),
                                    Step(StepKind.LOOP, dev, backing=os.fspath(ext4_image)),
                                    Step(StepKind.MOUNT, os.fspath(where))).to_json())
        result = dmoverlay("teardown", "--name", "live", "--state-dir", str(state_dir),
                           env={ENV: UTIL_LINUX, "DMOVERLAY_DEBUG": "1"})
        assert result.returncode == 0, result.stderr
        assert f"+ umount -- {where}\n" in result.stderr
        assert f"+ losetup --detach {dev}\n" in result.stderr
        assert _mounted(where) == []
        assert _loops_holding(ext4_image) == []
        assert not work.exists() and not (state_dir / "live.json").exists()
    finally:
        if _mounted(where):
            utillinux.unmount(str(where), lazy=True)
        if _loops_holding(ext4_image):
            blockdev.loop_teardown(dev, backing=ext4_image)
