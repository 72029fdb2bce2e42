"""Which block devices write through which: loops over files and over
devices, followed as sysfs tells (the output of bake and of mkupdates
--from-live may not land on the live root by any of them)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from dmoverlay.overlay.liveview import reaches, stands_on
from tests.conftest import small_tmpfs


def test_a_chain_is_followed_to_its_end_and_a_cycle_ends() -> None:
    under = {1: [2], 2: [3, 4], 4: [5], 6: [6], 7: [8], 8: [7]}
    follow = lambda dev: under.get(dev, [])  # noqa: E731
    assert reaches(1, 5, follow) and reaches(1, 3, follow) and reaches(1, 1, follow)
    assert not reaches(5, 1, follow) and not reaches(2, 1, follow)
    assert not reaches(6, 1, follow) and not reaches(7, 1, follow)


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def _loop(stack: ExitStack, backing: Path | str) -> str:
    dev = _sh("losetup", "--find", "--show", str(backing))
    stack.callback(subprocess.run, ["losetup", "--detach", dev], check=True)
    return dev


def _mounted_image(stack: ExitStack, image: Path, at: Path) -> tuple[str, int]:
    """An ext4 image made and mounted at `at` through a loop: (the loop, the
    filesystem's device number)."""
    _sh("mkfs.ext4", "-q", "-F", str(image), "4M")
    dev = _loop(stack, image)
    at.mkdir()
    _sh("mount", dev, str(at))
    stack.callback(subprocess.run, ["umount", str(at)], check=True)
    return dev, os.stat(at).st_dev


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.mark.root
def test_loops_are_followed_through_files_and_devices(tmp_path: Path, stack: ExitStack) -> None:
    """A tmpfs holds an image mounted at B, which holds one mounted at C; a
    loop over C's loop device stands on all three, and nothing on it."""
    top = stack.enter_context(small_tmpfs(tmp_path / "a", "size=16m"))
    a = os.stat(top).st_dev
    b_loop, b = _mounted_image(stack, top / "b.img", tmp_path / "b")
    c_loop, c = _mounted_image(stack, tmp_path / "b" / "c.img", tmp_path / "c")
    over = os.stat(_loop(stack, c_loop)).st_rdev
    assert stands_on(c, b) and stands_on(c, a) and stands_on(b, a)
    assert stands_on(over, c) and stands_on(over, a)
    assert stands_on(c, os.stat(b_loop).st_rdev)
    assert not stands_on(a, b) and not stands_on(b, c) and not stands_on(c, over)
    assert not stands_on(c, os.stat("/").st_dev)
    assert not stands_on(a, os.stat("/proc").st_dev)  # a tmpfs is on nothing sysfs knows


@pytest.mark.root
@pytest.mark.parametrize("name", [b"plain.img", b"img\xff.img", b"space.img ", b"deleted.img"])
def test_a_loop_is_followed_whatever_its_file_is_called_or_if_it_is_gone(
        tmp_path: Path, stack: ExitStack, name: bytes) -> None:
    """sysfs shows the file's path as text, trailing blanks trimmed by a
    reader, " (deleted)" once it is gone: the kernel's numbers are asked."""
    top = stack.enter_context(small_tmpfs(tmp_path / "a", "size=8m"))
    image = os.path.join(os.fsencode(top), name)
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    dev = _loop(stack, os.fsdecode(image))
    if name == b"deleted.img":
        os.unlink(image)
    assert stands_on(os.stat(dev).st_rdev, os.stat(top).st_dev)
    assert not stands_on(os.stat(dev).st_rdev, os.stat("/").st_dev)
