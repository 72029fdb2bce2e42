"""Finding the root filesystem: a disk's partitions as sfdisk lists them
(real tables written by sfdisk, and output that is not one)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from dmoverlay.core.errors import ImageError
from dmoverlay.core.sizes import KiB, MiB, round_up
from dmoverlay.core.superblock import parse_squashfs
from dmoverlay.overlay import devspec
from dmoverlay.overlay.media import _holds, _partitions, image_size, parse_partitions
from dmoverlay.overlay.options import SetupOptions


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_partitions_of_a_disk_image(tmp_path: Path, label: str) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "10M", disk], check=True)
    subprocess.run(["sfdisk", "-q", disk], input=f"label: {label}\n,4M\n,2M\n".encode(),
                   check=True)
    assert _partitions(str(disk)) == [(MiB, 4 * MiB), (5 * MiB, 2 * MiB)]


@pytest.mark.parametrize("text", [
    "", "[1, 2", "[]", '{"partitiontable": []}', '{"partitiontable": {"sectorsize": 0}}',
    '{"partitiontable": {"partitions": [{"start": 1}]}}',
    '{"partitiontable": {"partitions": [{"start": -8, "size": 8}]}}',
    '{"partitiontable": {"partitions": [{"start": "x", "size": 8}]}}',
    '{"partitiontable": {"partitions": 7}}',
    "[" * 100_000 + "]" * 100_000,
])
def test_what_sfdisk_says_of_a_hostile_table_is_one_line(text: str) -> None:
    with pytest.raises(ImageError, match="no usable partition table") as exc:
        parse_partitions(text, where="disk.img")
    assert "\n" not in exc.value.message and exc.value.hint


@pytest.mark.parametrize("live_dir", ["LiveOS", "Live OS"])
def test_an_ext_image_anywhere_is_looked_into(tmp_path: Path, live_dir: str) -> None:
    """A "?" in the image's path, or a blank in the live directory, reached
    debugfs as its options or as two words: the image was wrongly taken for
    one without the live directory (or setup stopped, blaming dmoverlay)."""
    where = tmp_path / "stick?offset=1024"
    (where / "tree" / live_dir).mkdir(parents=True)
    image = where / "medium.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(where / "tree"), str(image), "8M"],
                   check=True)
    opts = SetupOptions(image=devspec.location(str(image)), target=tmp_path,
                        live_dir=live_dir)
    assert _holds(str(image), opts)
    assert not _holds(str(image), replace(opts, live_dir="Other"))
    (tmp_path / "not-ext.img").write_bytes(bytes(1 << 20))
    assert not _holds(str(tmp_path / "not-ext.img"), opts)


@pytest.mark.root
def test_the_size_to_copy_of_an_image_on_a_larger_device(tmp_path: Path) -> None:
    """A partition is larger than its filesystem: --ram copies the
    filesystem (whole 4 KiB blocks, as a loop device needs them), a file
    whole."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/data").write_bytes(bytes(range(256)) * 4000)
    squash, ext = tmp_path / "squashfs.img", tmp_path / "rootfs.img"
    subprocess.run(["mksquashfs", str(tmp_path / "tree"), str(squash), "-quiet", "-noappend",
                    "-nopad"], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext), "4M"], check=True)
    used = parse_squashfs(squash.read_bytes()[:96]).bytes_used
    assert used % (4 * KiB)  # unpadded: a copy of bytes_used alone would be cut by the loop
    assert image_size(str(squash), squashfs=True) == squash.stat().st_size == used
    assert image_size(str(ext), squashfs=False) == 4 * MiB
    for image, squashfs, size in ((squash, True, round_up(used, 4 * KiB)),
                                  (ext, False, 4 * MiB)):
        with open(image, "ab") as f:
            f.truncate(8 * MiB)  # the partition's rest
        dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)],
                             capture_output=True, text=True, check=True).stdout.strip()
        try:
            assert image_size(dev, squashfs=squashfs) == size
        finally:
            subprocess.run(["losetup", "-d", dev], check=True)
