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
from dmoverlay.overlay import baseid, persistent
from dmoverlay.overlay.merge import Progress, parse_progress
from dmoverlay.overlay.store import check_base

pytestmark = pytest.mark.root  # merge is root's; these checks run as it


def ext4(path: Path, label: str = "BASE") -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-L", label, str(path), "8M"], check=True)
    return path


def identity(base: Path) -> baseid.BaseIdentity:
    head = base.read_bytes()[:baseid.HEAD_BYTES]
    return baseid.identify(head, base.stat().st_size // 512, where=str(base))


def store_of(base: Path, path: Path, entries: Sequence[tuple[int, int]] = (), *,
             chunk_sectors: int = 8) -> Path:
    """A store as setup makes it (4 KiB chunks) over `base`, holding `entries`."""
    data = bytearray(baseid.new_store(identity(base), chunk_sectors))
    data.extend(bytes((4 << 20) - len(data)))
    for i, (old, new) in enumerate(entries):
        struct.pack_into("<QQ", data, chunk_sectors * 512 + 16 * i, old, new)
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


# ------------------------------------------------------ a merge cut short


def mark_begun(store: Path, base: baseid.BaseIdentity) -> None:
    with open(store, "r+b") as f:
        f.seek(baseid.MERGING_OFFSET)
        f.write(baseid.encode_merging(base))


def test_a_merge_cut_short_goes_on_over_its_base_changed_by_it(tmp_path: Path) -> None:
    """The merge changed the base's first chunks (here: its label, so its
    superblock): the record no longer matches, the mark of the begun merge
    does (same UUID and size); done, the mark is gone and the base recorded."""
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store")
    mark_begun(store, identity(base))
    subprocess.run(["tune2fs", "-L", "MERGED", str(base)], check=True, capture_output=True)
    done = merge(base, store)
    assert done.returncode == 0, done.stderr
    head = store.read_bytes()[:4096]
    assert baseid.decode_merging(head, where="s") is None
    assert baseid.decode(head, where="s") == identity(base)


def test_without_the_mark_a_changed_base_is_another(tmp_path: Path) -> None:
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store")
    subprocess.run(["tune2fs", "-L", "MERGED", str(base)], check=True, capture_output=True)
    assert "a base of the same UUID" in one_error(merge(base, store))


def test_a_merge_begun_into_another_base_is_refused(tmp_path: Path) -> None:
    other = ext4(tmp_path / "other.img", "OTHER")
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store")
    mark_begun(store, identity(other))
    before = store.read_bytes()
    assert "was cut short; this base is" in one_error(merge(base, store))
    assert store.read_bytes() == before


def test_chunks_too_small_for_the_mark_are_merged_with_a_warning(tmp_path: Path) -> None:
    """1 KiB chunks hold the record, not the mark beside it: said before
    the merge begins (on a host without device-mapper it then stops)."""
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store", [(4000, 2)], chunk_sectors=2)
    with open(store, "r+b") as f:  # the change the exception names
        f.seek(2 * 1024)
        f.write(b"x" * 1024)
    before = store.read_bytes()
    result = merge(base, store)
    assert "chunks of 1024 bytes leave no room for the mark" in result.stderr, result.stderr
    if result.returncode == 0:  # a kernel with dm-snapshot
        assert base.read_bytes()[4000 * 1024:4001 * 1024] == b"x" * 1024
    else:
        assert "snapshot-merge" in one_error(result)
        assert store.read_bytes() == before


def test_setup_refuses_a_half_merged_store(tmp_path: Path) -> None:
    base = ext4(tmp_path / "base.img")
    store = store_of(base, tmp_path / "store")
    mark_begun(store, identity(base))
    head = store.read_bytes()[:65536]
    header = persistent.read_header(head, where="s")
    with pytest.raises(OverlayError, match="merge of this overlay into its base was cut short"):
        check_base(str(store), head, header, identity(base), shown="s", read_only=False)
