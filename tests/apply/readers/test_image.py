"""squashfs and ext images, mounted read-only and read as directories;
nothing stays mounted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.core.errors import SourceError
from tests import samples
from tests.apply.readers.readkit import (
    read_all,
    read_spec,
    shape,
    small_tree,
)

# --------------------------------------------------------------------- images


def make_squashfs(root: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def make_ext4(root: Path, out: Path) -> Path:
    with open(out, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(out)], check=True)
    return out


def mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f" {path}" in line]


@pytest.mark.root
@pytest.mark.parametrize("fmt", ["squashfs", "ext"])
def test_images_give_the_directory_members(tmp_path: Path, staging: Path, fmt: str) -> None:
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    os.setxattr(root / "etc/os-release", "user.comment", b"hello")
    image = (make_squashfs if fmt == "squashfs" else make_ext4)(root, tmp_path / "img")
    expected = read_spec(root, staging)
    with open_update(str(image), staging=staging) as reader:
        assert reader.description == f"{fmt} image {image}"
        assert mounted_under(staging)
        got = read_all(reader)
        assert read_all(reader) == got
    assert shape(got) == shape(expected)  # ext's empty lost+found is not part of it
    release = next(m for m, _ in got if m.name == "etc/os-release")
    assert ("user.comment", b"hello") in release.xattrs
    assert not mounted_under(staging)
    assert list(staging.iterdir()) == []


@pytest.mark.root
def test_truncated_image_fails_and_leaves_nothing(tmp_path: Path, staging: Path) -> None:
    root = small_tree(tmp_path / "tree")
    image = make_squashfs(root, tmp_path / "img")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError), open_update(str(image), staging=staging) as reader:
        read_all(reader)  # mounting or reading fails
    assert not mounted_under(staging)
    assert list(staging.iterdir()) == []


def test_images_need_root(tmp_path: Path, staging: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"hsqs" + bytes(8000))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SourceError, match="needs root"), \
            open_update(str(image), staging=staging):
        pass
    assert list(staging.iterdir()) == []
