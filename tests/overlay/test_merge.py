"""`dmoverlay merge`: what is decided before device-mapper is asked (here,
on real files: a real ext4 base and stores as setup writes them), and the
kernel's status line read.  The merge itself: tests/privileged/test_merge.py."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from dmoverlay.core.errors import OverlayError
from dmoverlay.overlay import baseid
from dmoverlay.overlay.merge import Progress, parse_progress

pytestmark = pytest.mark.root  # merge is root's; these checks run as it


def ext4(path: Path, label: str = "BASE") -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-L", label, str(path), "8M"], check=True)
    return path


def identity(base: Path) -> baseid.BaseIdentity:
    head = base.read_bytes()[:baseid.HEAD_BYTES]
    return baseid.identify(head, base.stat().st_size // 512, where=str(base))


def store_of(base: Path, path: Path, entries: Sequence[tuple[int, int]] = ()) -> Path:
    """A store as setup makes it (4 KiB chunks) over `base`, holding `entries`."""
    data = bytearray(baseid.new_store(identity(base)))
    data.extend(bytes((4 << 20) - len(data)))
    for i, (old, new) in enumerate(entries):
        struct.pack_into("<QQ", data, 4096 + 16 * i, old, new)
    path.write_bytes(bytes(data))
    return path


def merge(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmoverlay", "merge", *map(str, args),
                           "--name", f"t{os.getpid()}"],
                          capture_output=True, text=True, check=False)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_a_store_that_holds_nothing_is_renewed_for_the_base(tmp_path: Path) -> None:
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store")
    done = merge(base, store)
    assert done.returncode == 0, done.stderr
    assert "holds no changes: nothing to merge" in done.stderr
    assert baseid.decode(store.read_bytes()[:8192], where="s") == identity(base)


def test_a_store_of_another_base_is_refused_untouched(tmp_path: Path) -> None:
    other = ext4(tmp_path / "other.img", "OTHER")
    base = ext4(tmp_path / "base.img")
    store = store_of(other, tmp_path / "store", [(3, 2)])
    before = store.read_bytes()
    line = one_error(merge(base, store))
    assert "this overlay was made over another base" in line
    assert store.read_bytes() == before


def test_a_store_without_a_record_needs_force(tmp_path: Path) -> None:
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store", [(3, 2)])
    with open(store, "r+b") as f:  # as dracut leaves it: no record after the header
        f.seek(baseid.RECORD_OFFSET)
        f.write(bytes(baseid.RECORD_SIZE))
    line = one_error(merge(base, store))
    assert "no record of the base it belongs to" in line


@pytest.mark.parametrize("case", ["squashfs", "new-store", "damaged-table", "base-in-use"])
def test_what_cannot_be_merged_is_one_error_and_nothing_written(tmp_path: Path,
                                                               case: str) -> None:
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store", [(3, 2)])
    expect = {"squashfs": "holds no ext2/3/4 filesystem", "new-store": "a new, empty store",
              "damaged-table": "damaged store: entry 1 maps",
              "base-in-use": "is in use (by /dev/loop"}[case]
    if case == "squashfs":
        (tmp_path / "tree").mkdir()
        subprocess.run(["mksquashfs", str(tmp_path / "tree"), str(base), "-noappend", "-quiet"],
                       check=True, stdout=subprocess.DEVNULL)
    elif case == "new-store":
        store.write_bytes(bytes(4 << 20))
    elif case == "damaged-table":
        store_of(base, store, [(3, 2), (4, 9999)])
    before = {p: p.read_bytes() for p in (base, store)}
    loop = ""
    if case == "base-in-use":
        loop = subprocess.run(["losetup", "--find", "--show", str(base)], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        assert expect in one_error(merge(base, store))
    finally:
        if loop:
            subprocess.run(["losetup", "--detach", loop], check=True)
    assert {p: p.read_bytes() for p in (base, store)} == before


@pytest.mark.parametrize(("line", "progress"), [
    ("0 16384 snapshot-merge 40/8192 16", Progress(40, 16)),
    ("0 16384 snapshot-merge 16/8192 16\n", Progress(16, 16)),
])
def test_the_kernels_status_line_is_the_progress(line: str, progress: Progress) -> None:
    assert parse_progress(line) == progress


@pytest.mark.parametrize("line", [
    "0 16384 snapshot-merge Invalid", "0 16384 snapshot-merge Merge failed",
    "0 16384 snapshot-merge Overflow", "0 16384 snapshot 40/8192 16",
    "0 16384 snapshot-merge 8/8192 16", "0 16384 snapshot-merge x/8192 16", "",
])
def test_a_failed_or_strange_status_is_an_error(line: str) -> None:
    with pytest.raises(OverlayError):
        parse_progress(line)
