"""`dmoverlay apply` checks the room the overlay has left, whatever kind of
overlay the root is on: a thin pool in RAM, or a persistent store whose file
is allocated in full (its filesystem's free space is then beside the point)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.privileged.conftest import cli, error_line, setup_args, teardown
from tests.privileged.test_persistent import make_fs

MiB = 1 << 20


def _update(top: Path, size: int) -> Path:
    upd = top / f"upd-{size}"
    (upd / "var/lib").mkdir(parents=True)
    (upd / "var/lib/blob").write_bytes(os.urandom(size))
    return upd


def _apply(upd: Path, place: dict[str, Path]) -> str | None:
    """None if applied, else the error line."""
    result = cli("apply", str(upd), "--root", str(place["target"]), "--run-dir",
                 str(place["top"]), check=False)
    return None if result.returncode == 0 else error_line(result)


def _fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def test_a_thin_pool_that_would_fill_refuses_the_apply(images: dict[str, Path],
                                                       place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "48M", "--overlay-thin"))
    _fill(place["target"] / "var/filler", 24 * MiB)
    refused = _apply(_update(place["top"], 30 * MiB), place)
    assert refused is not None and "does not fit" in refused
    assert not (place["target"] / "var/lib/blob").exists()
    assert _apply(_update(place["top"], 4 * MiB), place) is None
    teardown(place)


def test_a_persistent_store_counts_its_own_room_not_its_disks(
        images: dict[str, Path], place: dict[str, Path]) -> None:
    """A 64 MiB store on a 96 MiB filesystem leaves the filesystem ~25 MiB
    free; an update of 40 MiB fits in the store and must be taken."""
    fs = make_fs(place["top"] / "fs.img", label="DMOSPACE")
    cli(*setup_args(images["squashfs"], place, "--overlay", f"{fs}:/LiveOS/o",
                    "--overlay-size", "64M"))
    assert _apply(_update(place["top"], 40 * MiB), place) is None
    assert (place["target"] / "var/lib/blob").stat().st_size == 40 * MiB
    refused = _apply(_update(place["top"], 30 * MiB), place)  # 40 + 30 > 64
    assert refused is not None and "does not fit" in refused
    teardown(place)
