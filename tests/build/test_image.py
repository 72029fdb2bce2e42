"""`dmoverlay build` end to end: real mkfs.ext4, debugfs and mksquashfs; the
result is loop-mounted (as root) and compared with the source entry by entry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dmoverlay.build import ext4
from dmoverlay.build.source import read_directory
from tests import samples
from tests.conftest import dmoverlay
from tests.treecheck import describe, differences, hardlink_groups, mounted_rootfs

NOBODY = 65534


def build_ok(*args: str, user: int | None = None, env: dict[str, str] | None = None) -> None:
    result = dmoverlay("-q", "build", *args, user=user, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.root
def test_directory_build_keeps_every_entry(rich_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "squashfs.img"
    build_ok(str(rich_tree), "-o", str(out))
    with mounted_rootfs(out, tmp_path) as image:
        assert differences(describe(rich_tree), describe(image)) == []
        assert hardlink_groups(image) == hardlink_groups(rich_tree)
        # a sparse file stays sparse
        assert os.lstat(image / "var/sparse.img").st_blocks * 512 <= 64 * 1024


@pytest.mark.root
def test_tar_build_as_normal_user_keeps_every_entry(rich_tree: Path, rich_tar: Path,
                                                    shared_dir: Path, tmp_path: Path) -> None:
    archive = shared_dir / "root.tar"
    shutil.copy(rich_tar, archive)
    out = shared_dir / "squashfs.img"
    build_ok(str(archive), "-o", str(out), user=NOBODY)
    assert os.stat(out).st_uid == NOBODY
    with mounted_rootfs(out, tmp_path) as image:
        assert differences(describe(rich_tree), describe(image)) == []
        assert hardlink_groups(image) == hardlink_groups(rich_tree)


@pytest.mark.root
def test_directory_build_as_normal_user(shared_dir: Path, tmp_path: Path) -> None:
    tree = shared_dir / "tree"
    samples.make_plain_tree(tree)
    subprocess.run(["chown", "-R", "-h", f"{NOBODY}:{NOBODY}", str(tree)], check=True)
    out = shared_dir / "squashfs.img"
    build_ok(str(tree), "-o", str(out), user=NOBODY)
    with mounted_rootfs(out, tmp_path) as image:
        assert differences(describe(tree), describe(image)) == []


@pytest.mark.root
def test_all_root_gives_root_ownership(shared_dir: Path, tmp_path: Path) -> None:
    tree = shared_dir / "tree"
    samples.make_plain_tree(tree)
    subprocess.run(["chown", "-R", "-h", f"{NOBODY}:{NOBODY}", str(tree)], check=True)
    out = shared_dir / "squashfs.img"
    build_ok(str(tree), "-o", str(out), "--all-root", user=NOBODY)
    with mounted_rootfs(out, tmp_path) as image:
        owners = {(m.uid, m.gid) for m in describe(image).values()}
    assert owners == {(0, 0)}


def test_same_tree_gives_identical_bytes(plain_tree: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    build_ok(str(plain_tree), "-o", str(first))
    # reading every file and changing ctimes must not change the image
    for dirpath, _, files in os.walk(plain_tree):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                Path(full).read_bytes()
                os.chmod(full, os.stat(full).st_mode)
    time.sleep(1.1)  # nothing may depend on the wall clock either
    build_ok(str(plain_tree), "-o", str(second))
    assert first.read_bytes() == second.read_bytes()


def test_same_archive_gives_identical_bytes_whatever_the_compression(
        plain_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "root.tar"
    subprocess.run(["tar", "--format=posix", "--numeric-owner", "-cf", str(archive),
                    "-C", str(plain_tree), "."], check=True)
    images = []
    for tool in ("cat", "gzip", "xz", "bzip2", "zstd"):
        packed = tmp_path / f"root.tar.{tool}"
        with open(packed, "wb") as f:
            subprocess.run([tool, "-c", str(archive)] if tool != "cat" else ["cat", str(archive)],
                           stdout=f, check=True)
        out = tmp_path / f"{tool}.img"
        build_ok(str(packed), "-o", str(out))
        images.append(out.read_bytes())
    assert all(image == images[0] for image in images)


def test_source_date_epoch_is_the_build_time(plain_tree: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    build_ok(str(plain_tree), "-o", str(a), env={"SOURCE_DATE_EPOCH": "1700000000"})
    build_ok(str(plain_tree), "-o", str(b), env={"SOURCE_DATE_EPOCH": "1700000001"})
    assert a.read_bytes() != b.read_bytes()
    inspect = subprocess.run(["unsquashfs", "-s", str(a)], capture_output=True, text=True,
                             check=True)
    assert "Tue Nov 14 22:13:20 2023" in inspect.stdout


def test_free_space_costs_almost_nothing(plain_tree: Path, tmp_path: Path) -> None:
    small, large = tmp_path / "small.img", tmp_path / "large.img"
    build_ok(str(plain_tree), "-o", str(small), "--free", "1M", "--compression", "zstd")
    build_ok(str(plain_tree), "-o", str(large), "--free", "8G", "--compression", "zstd")
    extra = large.stat().st_size - small.stat().st_size
    print(f"8 GiB of free space in rootfs.img added {extra} bytes to squashfs.img")
    assert extra < 256 * 1024


@pytest.mark.parametrize("compression", ["xz", "zstd", "lz4", "gzip"])
def test_compressors(plain_tree: Path, tmp_path: Path, compression: str) -> None:
    out = tmp_path / "squashfs.img"
    build_ok(str(plain_tree), "-o", str(out), "--compression", compression,
             "--block-size", "1M", "--free", "16M")
    sb = subprocess.run(["unsquashfs", "-s", str(out)], capture_output=True, text=True,
                        check=True).stdout
    assert f"Compression {compression}" in sb
    assert "Block size 1048576" in sb
    listing = subprocess.run(["unsquashfs", "-l", str(out)], capture_output=True, text=True,
                             check=True).stdout
    assert "squashfs-root/LiveOS/rootfs.img" in listing


def test_label_size_and_uuid_options(plain_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "squashfs.img"
    fs_uuid = "0b9d3c2a-5e1f-4a57-8c0d-2f1e3d4c5b6a"
    build_ok(str(plain_tree), "-o", str(out), "--label", "Anaconda", "--size", "300M",
             "--uuid", fs_uuid, "--compression", "zstd")
    subprocess.run(["unsquashfs", "-q", "-d", str(tmp_path / "x"), str(out)], check=True)
    rootfs = tmp_path / "x/LiveOS/rootfs.img"
    assert rootfs.stat().st_size == 300 << 20
    sb = subprocess.run(["dumpe2fs", "-h", str(rootfs)], capture_output=True, text=True,
                        check=True).stdout
    assert "Filesystem volume name:   Anaconda" in sb
    assert f"Filesystem UUID:          {fs_uuid}" in sb
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_output_directory_named_like_debugfs_options(plain_tree: Path, tmp_path: Path) -> None:
    """debugfs reads "?" in a device name as its options: an output
    directory named "o?offset=4096" is written all the same, the squashfs
    and the disk image alike, and both are what the same build writes
    elsewhere."""
    odd = tmp_path / "o?offset=4096"
    odd.mkdir()
    plain = tmp_path / "elsewhere"
    plain.mkdir()
    for where in (odd, plain):
        build_ok(str(plain_tree), "-o", str(where / "sq.img"), "--disk", str(where / "d.img"),
                 "--free", "8M", env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert (odd / "sq.img").read_bytes() == (plain / "sq.img").read_bytes()
    assert (odd / "d.img").read_bytes() == (plain / "d.img").read_bytes()


def test_json_summary_is_what_it_was(plain_tree: Path, tmp_path: Path) -> None:
    """`build --json` prints, key for key and in this order, the summary it
    printed before BuildResult had a to_dict()."""
    out, disk_img = tmp_path / "sq.img", tmp_path / "disk.img"
    fs_uuid = "0b9d3c2a-5e1f-4a57-8c0d-2f1e3d4c5b6a"
    result = dmoverlay("-q", "build", str(plain_tree), "-o", str(out), "--free", "8M",
                       "--uuid", fs_uuid, "-L", "json", "--disk", str(disk_img), "--json",
                       env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert result.returncode == 0, result.stderr
    tree = read_directory(plain_tree)
    plan = ext4.plan(tree, size=None, free=8 * 1024 * 1024, label="json", fs_uuid=fs_uuid,
                     epoch=1700000000)
    expected = {
        "output": str(out),
        "squashfs_bytes": out.stat().st_size,
        "entries": len(tree.entries),
        "data_bytes": tree.data_bytes(),
        "rootfs": {"size": plan.size, "inodes": plan.inodes, "label": "json",
                   "uuid": fs_uuid, "epoch": 1700000000},
        "disk": str(disk_img),
    }
    assert result.stdout == json.dumps(expected, indent=2) + "\n"
    no_disk = dmoverlay("-q", "build", str(plain_tree), "-o", str(tmp_path / "b.img"),
                        "--json")
    assert json.loads(no_disk.stdout)["disk"] is None
