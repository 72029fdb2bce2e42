"""Finding the root filesystem: a disk's partitions as sfdisk lists them
(real tables written by sfdisk, and output that is not one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dmoverlay.core.errors import ImageError
from dmoverlay.core.sizes import MiB
from dmoverlay.overlay.media import _partitions, parse_partitions


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
