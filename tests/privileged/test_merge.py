"""`dmoverlay merge`: a persistent overlay folded into its writable base by
the kernel's snapshot-merge; the base alone then holds the merged view,
entry by entry, and a merge cut short goes on where it stopped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmoverlay.overlay.merge import _held
from tests.privileged.conftest import cli, error_line, resources, setup_args, status, teardown
from tests.privileged.test_bake import change
from tests.treecheck import describe, differences, hardlink_groups

pytestmark = pytest.mark.privileged

CHUNK = 4096  # setup's chunk size


def writable_base(images: dict[str, Path], top: Path) -> Path:
    """The rootfs.img build made, unpacked: an ext4 image file to write."""
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(top / "unpacked"),
                    str(images["squashfs"]), "LiveOS/rootfs.img"], check=True,
                   stdout=subprocess.DEVNULL)
    base = top / "base.img"
    os.rename(top / "unpacked/LiveOS/rootfs.img", base)
    return base


def changed_overlay(images: dict[str, Path],
                    place: dict[str, Path]) -> tuple[Path, Path, dict[str, object], object]:
    """A base, and a store holding every kind of change over it (torn
    down); what the live root showed, and its hard links."""
    base = writable_base(images, place["top"])
    store = place["top"] / "live.overlay"
    cli(*setup_args(base, place, "--overlay", str(store), "--overlay-size", "64M"))
    root = place["target"]
    change(root)
    want, groups = describe(root), hardlink_groups(root)
    teardown(place)
    return base, store, want, groups  # type: ignore[return-value]


def check_base(base: Path, want: dict[str, object], groups: object, where: Path) -> None:
    where.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,noload", str(base), str(where)], check=True)
    try:
        assert differences(want, describe(where)) == []  # type: ignore[arg-type]
        assert hardlink_groups(where) == groups
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_the_base_alone_holds_the_merged_view(images: dict[str, Path],
                                              place: dict[str, Path]) -> None:
    before = resources()
    base, store, want, groups = changed_overlay(images, place)
    held = len(_held(str(store), CHUNK, base.stat().st_size))
    assert held > 3 * (1 << 20) // CHUNK
    done = cli("merge", str(base), str(store), "--name", str(place["name"]))
    print(done.stdout.strip())
    assert done.stdout.startswith(f"{store}: {held} chunks merged into {base} in ")
    assert f"merged {held} of {held} chunks (100%)" in done.stderr
    check_base(base, want, groups, place["top"] / "view")
    assert _held(str(store), CHUNK, base.stat().st_size) == []
    # the store is a new one of the merged base: set up over both again, it holds only
    # what mounting wrote (the superblock's chunk), not the 3 MiB and more it held
    cli(*setup_args(base, place, "--overlay", str(store)))
    kept = status(place)["layers"][1]
    assert kept["layer"] == "store" and kept["used"] <= 16 * CHUNK
    assert differences(want, describe(place["target"])) == []  # type: ignore[arg-type]
    teardown(place)
    assert resources() == before


def test_a_merge_cut_short_goes_on_where_it_stopped(images: dict[str, Path],
                                                   place: dict[str, Path]) -> None:
    """The base behind dm-delay (each write 500 ms late): --timeout cuts the
    merge, what was merged stays merged; a NAME-merge left as by a killed
    merge is taken down and gone on with."""
    before = resources()
    base, store, want, groups = changed_overlay(images, place)
    name = str(place["name"])
    size = base.stat().st_size
    held = len(_held(str(store), CHUNK, size))
    loop = subprocess.run(["losetup", "--find", "--show", str(base)], capture_output=True,
                          text=True, check=True).stdout.strip()
    slow = f"{name}-slow"
    subprocess.run(["dmsetup", "create", slow, "--table",
                    f"0 {size // 512} delay {loop} 0 0 {loop} 0 500"], check=True)
    try:
        cut = cli("merge", f"/dev/mapper/{slow}", str(store), "--name", name, "--timeout",
                  "0.3", check=False)
        assert "the merge stopped with" in error_line(cut)
        left = len(_held(str(store), CHUNK, size))
        assert 0 < left < held, (left, held)
        # half merged: setup will not take the two
        refused = cli(*setup_args(f"/dev/mapper/{slow}", place, "--overlay", str(store)),
                      check=False)
        assert "a merge of this overlay into its base was cut short" in error_line(refused)
        # as a merge that was killed leaves it: its device, over a loop of the store
        store_loop = subprocess.run(["losetup", "--find", "--show", str(store)],
                                    capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["dmsetup", "create", f"{name}-merge", "--table",
                        f"0 {size // 512} snapshot-merge /dev/mapper/{slow} {store_loop} P 8"],
                       check=True)
        done = cli("merge", f"/dev/mapper/{slow}", str(store), "--name", name)
        assert "(a merge cut short, gone on with)" in done.stdout
    finally:
        subprocess.run(["dmsetup", "remove", slow], check=False)
        subprocess.run(["losetup", "--detach", loop], check=True)
    check_base(base, want, groups, place["top"] / "view")
    assert resources() == before
