"""squashfs and ext images, mounted read-only and read as directories;
nothing stays mounted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmoverlay.apply.readers import image as image_module
from dmoverlay.apply.readers import open_update
from dmoverlay.apply.readers.detect import Format
from dmoverlay.apply.readers.image import open_image
from dmoverlay.build.image import BuildOptions
from dmoverlay.build.image import build as build_image
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import SourceError
from tests import samples
from tests.apply.readers.readkit import (
    Read,
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


def test_a_squashfs_build_did_not_make_is_refused_without_root(tree: Path, tmp_path: Path,
                                                            staging: Path) -> None:
    image = make_squashfs(tree, tmp_path / "img")
    with pytest.raises(SourceError, match="works only for the one build makes"), \
            open_image(image, Format.SQUASHFS, staging=staging, label="img", privileged=False):
        pass
    assert list(staging.iterdir()) == []


def test_a_link_where_build_puts_its_rootfs_is_refused_without_root(tmp_path: Path,
                                                                   staging: Path) -> None:
    """Its listing is build's, but what unsquashfs wrote is judged."""
    (tmp_path / "top/LiveOS").mkdir(parents=True)
    os.symlink("/etc/passwd", tmp_path / "top/LiveOS/rootfs.img")
    image = make_squashfs(tmp_path / "top", tmp_path / "img")
    with pytest.raises(SourceError, match="works only for the one build makes"), \
            open_image(image, Format.SQUASHFS, staging=staging, label="img", privileged=False):
        pass
    assert list(staging.iterdir()) == []


def test_an_ext_image_without_fuse_is_one_error(tree: Path, tmp_path: Path, staging: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    image = make_ext4(tree, tmp_path / "img")
    monkeypatch.setattr(image_module, "FUSE_DEVICE", os.fspath(tmp_path / "no-fuse"))
    with pytest.raises(SourceError, match=r"needs FUSE.*\(there is none\)"), \
            open_image(image, Format.EXT, staging=staging, label="img", privileged=False):
        pass
    assert list(staging.iterdir()) == []


# ------------------------------------------------- without root, through FUSE


@pytest.mark.root
def test_an_ext_image_reads_the_same_through_fuse(rich_tree: Path, tmp_path: Path,
                                                  staging: Path) -> None:
    """Owners, modes, times, devices, xattrs, hard links, odd names: what
    the kernel's ext4 gives, entry for entry."""
    tree = tmp_path / "tree"
    subprocess.run(["cp", "-a", rich_tree, tree], check=True)
    os.link(tree / "etc/os-release", tree / "etc/os-release.link")
    image = make_ext4(tree, tmp_path / "img")
    kernel = read_image(image, Format.EXT, staging, privileged=True)
    with open_image(image, Format.EXT, staging=staging, label="img",
                    privileged=False) as reader:
        assert any(" fuse" in line for line in mounted_under(staging))
        fused = read_all(reader)
    assert fused == kernel
    assert any(m.kind is Kind.HARDLINK for m, _ in fused)
    assert any(m.kind is Kind.CHAR for m, _ in fused)
    assert not mounted_under(staging)
    assert list(staging.iterdir()) == []


@pytest.mark.root
def test_a_squashfs_build_made_is_its_rootfs_unpacked_without_root(plain_tree: Path,
                                                                  tmp_path: Path,
                                                                  staging: Path) -> None:
    image = tmp_path / "squashfs.img"
    build_image(BuildOptions(source=plain_tree, output=image, free=8 << 20))
    kernel = read_image(image, Format.SQUASHFS, staging, privileged=True)
    unpacked = read_image(image, Format.SQUASHFS, staging, privileged=False)
    assert [m.name for m, _ in unpacked] == ["", "LiveOS", "LiveOS/rootfs.img"]
    assert unpacked[-1][1] == kernel[-1][1]  # the ext image, byte for byte
    assert list(staging.iterdir()) == []


@pytest.mark.root
def test_a_damaged_ext_image_through_fuse_is_one_error(tree: Path, tmp_path: Path,
                                                       staging: Path) -> None:
    image = make_ext4(tree, tmp_path / "img")
    with open(image, "r+b") as f:  # the superblock's magic
        f.seek(1024 + 0x38)
        f.write(b"\0\0")
    with pytest.raises(SourceError, match="cannot mount the ext image with fuse2fs"), \
            open_image(image, Format.EXT, staging=staging, label="img", privileged=False):
        pass
    assert not mounted_under(staging)
    assert list(staging.iterdir()) == []


def read_image(image: Path, fmt: Format, staging: Path, *, privileged: bool) -> Read:
    with open_image(image, fmt, staging=staging, label=str(image),
                    privileged=privileged) as reader:
        return read_all(reader)
