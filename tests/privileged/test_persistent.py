"""Persistent overlays on the real kernel (dracut's rd.live.overlay=<device>:<path>,
.reset, .readonly): changes kept across a teardown, in a plain file, in a file on a
device found by its label, in a filesystem image, and on a raw partition; a reset
wipes them; read-only shows them and forgets new writes; every fault releases
whatever was attached and leaves the overlay file as it was."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.privileged.conftest import (
    cli,
    error_line,
    resources,
    setup_args,
    status,
    teardown,
)
from tests.treecheck import digest

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def make_fs(path: Path, *, label: str, size: int = 96 * MiB) -> Path:
    """An ext4 filesystem image with an empty LiveOS/ directory, as a live stick has."""
    tree = path.parent / f"{path.name}.tree"
    (tree / "LiveOS").mkdir(parents=True)
    with open(path, "xb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", str(tree), str(path))
    return path


def attach(path: Path, *options: str) -> str:
    dev = sh("losetup", "--find", "--show", *options, str(path))
    subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
    return dev


@pytest.fixture
def store_dev(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A block device holding an ext4 filesystem with a label of its own: (device, label)."""
    label = f"DMOP{os.getpid() % 100000}"
    dev = attach(make_fs(tmp_path / "store.img", label=label))
    try:
        yield dev, label
    finally:
        sh("losetup", "-d", dev)


def files_in(dev: str, where: Path) -> dict[str, int]:
    """Names and sizes of LiveOS/ on a device, mounted read-only for a look."""
    where.mkdir()
    sh("mount", "-o", "ro", dev, str(where))
    try:
        return {p.name: p.stat().st_size for p in (where / "LiveOS").iterdir()}
    finally:
        sh("umount", str(where))


def test_changes_survive_teardown_until_a_reset(images: dict[str, Path],
                                                place: dict[str, Path]) -> None:
    store = place["top"] / "live.overlay"
    root = place["target"]
    before = resources()
    squash_sum = digest(images["squashfs"])
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-size", "64M"))
    assert store.stat().st_size == 64 * MiB
    data = os.urandom(3 * MiB)
    (root / "var/kept").write_bytes(data)
    (root / "etc/os-release").write_text("NAME=Changed\n")
    (root / "etc/empty").unlink()
    os.sync()
    st = status(place)
    assert (st["mode"], st["overlay"], st["state"]) == ("persistent", str(store), "active")
    assert st["used"] > len(data) and st["total"] > 60 * MiB and st["ram_free"] is None
    teardown(place)
    assert resources() == before
    assert store.stat().st_size == 64 * MiB, "teardown must keep the overlay file"

    cli(*setup_args(images["squashfs"], place, "--overlay", str(store)))
    assert (root / "var/kept").read_bytes() == data
    assert (root / "etc/os-release").read_text() == "NAME=Changed\n"
    assert not (root / "etc/empty").exists()
    teardown(place)

    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-reset"))
    assert not (root / "var/kept").exists()
    assert (root / "etc/os-release").read_text() == "NAME=Sample\nID=sample\n"
    assert (root / "etc/empty").exists()
    teardown(place)
    assert resources() == before
    assert digest(images["squashfs"]) == squash_sum


def _store_with_a_change(images: dict[str, Path], place: dict[str, Path],
                         size: str) -> tuple[Path, str]:
    """A persistent overlay file holding var/old, torn down; it and its digest."""
    store = place["top"] / "live.overlay"
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-size", size))
    (place["target"] / "var/old").write_text("old\n")
    teardown(place)
    return store, digest(store)


def test_readonly_shows_old_changes_and_forgets_new_ones(images: dict[str, Path],
                                                         place: dict[str, Path]) -> None:
    root = place["target"]
    before = resources()
    store, store_sum = _store_with_a_change(images, place, "32M")
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-readonly",
                    "--overlay-size", "32M"))
    st = status(place)
    assert (st["mode"], st["overlay"]) == ("readonly", str(store))
    assert 0 < st["overlay_used"] < st["overlay_total"] <= 32 * MiB  # the store shown
    shown = cli("status", "--name", str(place["name"]), "--state-dir", str(place["state"]))
    assert f"{store} shown read-only (" in shown.stdout
    base, kept, ram = st["layers"]
    assert (base["layer"], kept["layer"], ram["layer"]) == ("base", "store", "ram")
    assert (kept["path"], kept["used"], kept["size"]) == (
        str(store), st["overlay_used"], st["overlay_total"])
    assert shown.stdout.splitlines()[2].startswith(
        f"  store {store}: changes of earlier boots, shown read-only, ")
    assert st["ram_free"] is not None and st["total"] < 33 * MiB
    assert (root / "var/old").read_text() == "old\n"
    (root / "var/old").write_text("changed\n")
    (root / "var/new").write_bytes(os.urandom(MiB))
    os.sync()
    assert status(place)["used"] > MiB
    teardown(place)
    assert digest(store) == store_sum, "a read-only overlay must not be written"

    cli(*setup_args(images["squashfs"], place, "--overlay", str(store)))
    assert (root / "var/old").read_text() == "old\n"
    assert not (root / "var/new").exists()
    teardown(place)
    assert resources() == before


def test_overlay_on_a_labelled_device(images: dict[str, Path], place: dict[str, Path],
                                      store_dev: tuple[str, str]) -> None:
    """dracut's default: rd.live.overlay=LABEL=X finds /LiveOS/overlay-<label>-<uuid>,
    named after the live medium; then the same file by its explicit path."""
    dev, label = store_dev
    root = place["target"]
    before = resources()
    cli(*setup_args(images["disk"], place, "--overlay", f"LABEL={label}", "--overlay-size",
                    "32M"))
    assert any(line.split()[0] == dev for line in Path("/proc/mounts").read_text().splitlines())
    (root / "var/kept").write_text("on the stick\n")
    teardown(place)
    assert resources() == before, "teardown must unmount the overlay's device"
    made = files_in(dev, place["top"] / "look")
    [name] = made
    assert name.startswith("overlay-DMOTEST-") and made[name] == 32 * MiB

    cli(*setup_args(images["squashfs"], place, "--overlay", f"LABEL={label}:/LiveOS/{name}"))
    assert (root / "var/kept").read_text() == "on the stick\n"
    assert status(place)["overlay"] == f"LABEL={label}:/LiveOS/{name}"
    teardown(place)
    assert resources() == before


def test_overlay_in_a_filesystem_image(images: dict[str, Path], place: dict[str, Path]) -> None:
    fs = make_fs(place["top"] / "fs.img", label="DMOFSIMG")
    root = place["target"]
    before = resources()
    for extra in (("--overlay-size", "16M"), ()):
        cli(*setup_args(images["squashfs"], place, "--overlay", f"{fs}:/LiveOS/o", *extra))
        kept = root / "var/kept"
        if extra:
            kept.write_text("in an image\n")
        else:
            assert kept.read_text() == "in an image\n"
        teardown(place)
        assert resources() == before


def test_raw_overlay_partition(images: dict[str, Path], place: dict[str, Path]) -> None:
    """`dmoverlay build --disk --overlay-size` makes a raw overlay partition:
    PARTLABEL=<label>-overlay alone uses it as the store itself."""
    disk = place["top"] / "stick.img"
    sh("cp", "--sparse=always", str(images["disk"]), str(disk))
    dev = attach(disk, "--partscan")
    root = place["target"]
    try:
        before = resources()
        for n in range(2):
            cli(*setup_args(images["squashfs"], place, "--overlay", "PARTLABEL=DMOTEST-overlay"))
            if n == 0:
                (root / "var/kept").write_text("raw\n")
            else:
                assert (root / "var/kept").read_text() == "raw\n"
            assert status(place)["overlay"].startswith(f"{dev}p2")
            teardown(place)
            assert resources() == before
    finally:
        sh("losetup", "-d", dev)


# ------------------------------------------------------------------ faults


def _zeroed(path: Path, size: int) -> Path:
    with open(path, "xb") as f:
        f.truncate(size)
    return path


def _invalid_store(path: Path) -> Path:
    _zeroed(path, 16 * MiB)
    with open(path, "r+b") as f:
        f.write(b"SnAp" + struct.pack("<III", 0, 1, 8))
    return path


FAULTS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "no device matches": (lambda top: ["--overlay", "LABEL=dmo-no-such-label:/o",
                                       "--overlay-size", "16M"], "no device matches"),
    "missing without a size": (lambda top: ["--overlay", str(top / "none.overlay")],
                               "no such overlay file"),
    "wrong size": (lambda top: ["--overlay", str(_zeroed(top / "o", 32 * MiB)),
                                "--overlay-size", "16M"], "not the --overlay-size"),
    "too small": (lambda top: ["--overlay", str(_zeroed(top / "o", 4096))], "too small"),
    # a filesystem image named as the store is refused as the text is read,
    # pointing to o:auto (the unit tests show the store's own header check)
    "not a store": (lambda top: ["--overlay", str(make_fs(top / "o", label="X", size=16 * MiB))],
                    "holds a filesystem (ext), not an overlay store"),
    "invalid store": (lambda top: ["--overlay", str(_invalid_store(top / "o"))],
                      "marked this overlay store invalid"),
    "read-only and empty": (lambda top: ["--overlay", str(_zeroed(top / "o", 16 * MiB)),
                                         "--overlay-readonly"], "an empty overlay"),
    "no such directory": (lambda top: ["--overlay", f"{make_fs(top / 'fs', label='Y')}:/a/o",
                                       "--overlay-size", "16M"], "its directory does not exist"),
    "reset and readonly": (lambda top: ["--overlay", "/o", "--overlay-reset",
                                        "--overlay-readonly"], "contradict"),
}


def overlay_files(top: Path) -> dict[Path, str]:
    # the overlay files are "o" (a filesystem image mounted read-write changes)
    return {p: digest(p) for p in top.iterdir() if p.is_file() and p.name.startswith("o")}


@pytest.mark.parametrize("case", list(FAULTS))
def test_faults_release_everything(images: dict[str, Path], place: dict[str, Path],
                                   case: str) -> None:
    make, words = FAULTS[case]
    args = make(place["top"])
    files = overlay_files(place["top"])
    before = resources()
    result = cli(*setup_args(images["squashfs"], place, *args), check=False)
    assert words in error_line(result)
    assert resources() == before
    assert overlay_files(place["top"]) == files, \
        "a failed setup must leave overlay files as they were, and make none"
    assert not place["state"].exists() or not list(place["state"].glob("*.json"))


def test_read_only_device(images: dict[str, Path], place: dict[str, Path]) -> None:
    fs = make_fs(place["top"] / "fs.img", label="DMORO")
    dev = attach(fs, "--read-only")
    try:
        before = resources()
        result = cli(*setup_args(images["squashfs"], place, "--overlay", f"{dev}:/LiveOS/o",
                                 "--overlay-size", "16M"), check=False)
        assert "is read-only" in error_line(result)
        assert resources() == before
    finally:
        sh("losetup", "-d", dev)


def test_readonly_overlay_under_a_thin_ram_layer(images: dict[str, Path],
                                                 place: dict[str, Path]) -> None:
    root = place["target"]
    before = resources()
    store, store_sum = _store_with_a_change(images, place, "16M")
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-readonly",
                    "--overlay-thin", "--overlay-size", "32M"))
    st = status(place)
    assert (st["mode"], st["thin"]) == ("readonly", True)
    assert (root / "var/old").read_text() == "old\n"
    (root / "var/new").write_text("new\n")
    teardown(place)
    assert digest(store) == store_sum
    assert resources() == before


def test_overlay_beside_the_live_image_on_one_stick(images: dict[str, Path],
                                                     place: dict[str, Path]) -> None:
    """As livecd-iso-to-disk makes a stick and dracut boots it (root=live:LABEL=X
    rd.live.overlay=LABEL=X): LiveOS/squashfs.img and LiveOS/overlay-X-<uuid> on
    one filesystem, which is then mounted read-write once."""
    label = f"DMOS{os.getpid() % 100000}"
    fs = make_fs(place["top"] / "stick.img", label=label, size=160 * MiB)
    dev = attach(fs)
    root = place["target"]
    try:
        sh("debugfs", "-w", "-R", f"write {images['squashfs']} /LiveOS/squashfs.img", dev)
        before = resources()
        for n in range(2):
            cli(*setup_args(f"LABEL={label}", place, "--overlay", f"LABEL={label}",
                            *(("--overlay-size", "16M") if n == 0 else ())))
            if n == 0:
                (root / "var/kept").write_text("beside\n")
            else:
                assert (root / "var/kept").read_text() == "beside\n"
            assert status(place)["overlay"].startswith(f"LABEL={label}:/LiveOS/overlay-{label}-")
            teardown(place)
            assert resources() == before
        assert set(files_in(dev, place["top"] / "look")) == {
            "squashfs.img", f"overlay-{label}-{sh('blkid', '-o', 'value', '-s', 'UUID', dev)}"}
    finally:
        sh("losetup", "-d", dev)


def test_an_overlay_in_use_is_refused(images: dict[str, Path], place: dict[str, Path]) -> None:
    store = place["top"] / "live.overlay"
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-size", "16M"))
    (place["target"] / "var/kept").write_text("first\n")
    os.sync()
    store_sum = digest(store)
    other = place["top"] / "other"
    other.mkdir()
    before = resources()
    for extra in (("--overlay-reset",), ("--overlay-readonly",)):
        again = cli("setup", str(images["squashfs"]), "--target", str(other), "--name",
                    f"{place['name']}x", "--state-dir", str(place["state"]), "--overlay",
                    str(store), *extra, check=False)
        assert "is in use already" in error_line(again)
        assert resources() == before
    assert digest(store) == store_sum
    teardown(place)


@pytest.mark.parametrize("delay", [1.0, 4.0])
def test_setup_killed_half_way_keeps_the_overlay(images: dict[str, Path],
                                                  place: dict[str, Path], delay: float) -> None:
    store = place["top"] / "live.overlay"
    root = place["target"]
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store), "--overlay-size", "16M"))
    (root / "var/kept").write_text("kept\n")
    teardown(place)
    before = resources()
    proc = subprocess.Popen([sys.executable, "-m", "dmoverlay", *setup_args(
        images["squashfs"], place, "--overlay", str(store))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    teardown(place)
    assert resources() == before
    assert store.stat().st_size == 16 * MiB
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store)))
    assert (root / "var/kept").read_text() == "kept\n"
    teardown(place)


# ------------------------------------------------------------------ the base a store belongs to


@pytest.fixture(scope="module")
def image_b(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same runtime rebuilt with one more file: another base."""
    top = tmp_path_factory.mktemp("image-b")
    sh("cp", "-a", str(images["tree"]), str(top / "tree"))
    (top / "tree/etc/rebuilt").write_text("B\n")
    cli("-q", "build", str(top / "tree"), "-o", str(top / "squashfs.img"), "--free", "256M",
        "--compression", "zstd")
    return top / "squashfs.img"


def test_a_store_is_refused_over_another_base(images: dict[str, Path], image_b: Path,
                                              place: dict[str, Path]) -> None:
    root = place["target"]
    store, store_sum = _store_with_a_change(images, place, "32M")
    before = resources()
    for extra in ([], ["--overlay-readonly"]):
        result = cli(*setup_args(image_b, place, "--overlay", str(store), *extra), check=False)
        line = error_line(result)
        assert f"{store}: this overlay was made over another base: ext4 UUID " in line, line
        assert "--overlay-reset" in result.stderr
        assert resources() == before, "refused before anything stays attached"
        assert digest(store) == store_sum, "the store must be untouched"
    cli(*setup_args(images["squashfs"], place, "--overlay", str(store)))  # its own base
    assert (root / "var/old").read_text() == "old\n"
    teardown(place)
    cli(*setup_args(image_b, place, "--overlay", str(store), "--overlay-reset"))
    assert (root / "etc/rebuilt").read_text() == "B\n" and not (root / "var/old").exists()
    teardown(place)
    assert resources() == before


def _rootfs_loop(squashfs: Path, where: Path) -> tuple[str, str]:
    """The squashfs mounted at `where` and its rootfs.img on a read-only loop."""
    where.mkdir()
    sh("mount", "-o", "ro", str(squashfs), str(where))
    return str(where), attach(where / "LiveOS/rootfs.img", "--read-only")


def test_a_store_dracut_made_is_recorded_then_checked(images: dict[str, Path], image_b: Path,
                                                      place: dict[str, Path]) -> None:
    """A store the kernel itself made (as under dracut): no record; taken
    with a warning and recorded the first time, refused over B after."""
    store = _zeroed(place["top"] / "live.overlay", 32 * MiB)
    mounted, base = _rootfs_loop(images["squashfs"], place["top"] / "sq")
    cow = attach(store)
    name = f"dmo-dracut-{os.getpid()}"
    try:
        sectors = sh("blockdev", "--getsz", base)
        sh("dmsetup", "create", name, "--table", f"0 {sectors} snapshot {base} {cow} P 8")
        sh("dmsetup", "remove", name)
    finally:
        sh("losetup", "-d", cow)
        sh("losetup", "-d", base)
        sh("umount", mounted)
    head = store.read_bytes()[:4096]
    assert head[:4] == b"SnAp" and head[16:] == bytes(4096 - 16)
    first = cli(*setup_args(images["squashfs"], place, "--overlay", str(store)))
    assert "no record of the base it belongs to (made by dracut?)" in first.stderr
    assert "and recorded" in first.stderr
    (place["target"] / "var/old").write_text("old\n")
    teardown(place)
    again = cli(*setup_args(images["squashfs"], place, "--overlay", str(store)))
    assert "no record" not in again.stderr
    assert (place["target"] / "var/old").read_text() == "old\n"
    teardown(place)
    store_sum = digest(store)
    result = cli(*setup_args(image_b, place, "--overlay", str(store)), check=False)
    assert "this overlay was made over another base" in error_line(result)
    assert digest(store) == store_sum
