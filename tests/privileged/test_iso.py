"""A live ISO, laid out as livecd-tools and lorax make them (LiveOS/squashfs.img
on an ISO 9660 filesystem): set up from the image file, and from the attached
medium found by CDLABEL=, dracut's root=live:CDLABEL=... name for it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.conftest import cli, error_line, resources, setup_args, teardown

pytestmark = pytest.mark.privileged

LABEL = "DMO_LIVE_ISO"


@pytest.fixture(scope="module")
def iso(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("iso")
    (top / "tree/LiveOS").mkdir(parents=True)
    shutil.copy(images["squashfs"], top / "tree/LiveOS/squashfs.img")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", LABEL, "-R", "-J",
                    "-o", str(top / "live.iso"), str(top / "tree")], check=True)
    return top / "live.iso"


@pytest.fixture
def attached_iso(iso: Path) -> Iterator[str]:
    """The ISO as a read-only block device, as a CD drive gives it."""
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(iso)],
                         capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def _check_live(place: dict[str, Path]) -> None:
    root = place["target"]
    assert (root / "etc/os-release").read_text() == "NAME=Sample\nID=sample\n"
    (root / "var/written").write_bytes(b"in the overlay")  # writable over a read-only medium
    assert (root / "var/written").read_bytes() == b"in the overlay"


def test_iso_image_file(iso: Path, place: dict[str, Path]) -> None:
    before = resources()
    cli(*setup_args(iso, place, "--overlay-size", "32M"))
    _check_live(place)
    teardown(place)
    assert resources() == before


@pytest.mark.parametrize("spec", [f"CDLABEL={LABEL}", f"live:CDLABEL={LABEL}"])
def test_cdlabel(attached_iso: str, place: dict[str, Path], spec: str) -> None:
    before = resources()
    cli(*setup_args(spec, place, "--overlay-size", "32M"))
    _check_live(place)
    teardown(place)
    assert resources() == before


def test_cdlabel_of_no_medium(place: dict[str, Path]) -> None:
    before = resources()
    result = cli(*setup_args("CDLABEL=NO_SUCH_DISC", place), check=False)
    assert "no device matches" in error_line(result)
    assert resources() == before


def test_iso_without_live_directory(tmp_path: Path, place: dict[str, Path]) -> None:
    (tmp_path / "tree/boot").mkdir(parents=True)
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "OTHER", "-R",
                    "-o", str(tmp_path / "other.iso"), str(tmp_path / "tree")], check=True)
    before = resources()
    result = cli(*setup_args(tmp_path / "other.iso", place), check=False)
    assert "LiveOS/" in error_line(result)
    assert resources() == before
