"""Finding the root filesystem: a disk's partitions as sfdisk lists them
(real tables written by sfdisk, and output that is not one)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from dmoverlay.core.errors import ImageError
from dmoverlay.core.sizes import MiB
from dmoverlay.overlay import devspec
from dmoverlay.overlay.media import _holds, _partitions, parse_partitions
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
