"""dmoverlay setup / status / teardown on the real kernel: an image made by
`dmoverlay build`, a dm-snapshot with its COW in RAM, apply through it, and
every fault releasing whatever was attached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.core.sizes import format_size
from tests.privileged.conftest import (
    cli,
    error_line,
    resources,
    setup_args,
    status,
    teardown,
    write_until_it_fails,
)
from tests.treecheck import digest

pytestmark = pytest.mark.privileged


@pytest.mark.parametrize("backend", ["", "util-linux"], ids=["auto", "util-linux"])
def test_the_whole_story(images: dict[str, Path], place: dict[str, Path], backend: str,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the backend dmoverlay chooses, and through util-linux's tools
    alone (what an initramfs without gi uses): DMOVERLAY_DEBUG shows each
    command, and which backend ran."""
    monkeypatch.setenv("DMOVERLAY_BLOCKDEV", backend)
    if backend:
        monkeypatch.setenv("DMOVERLAY_DEBUG", "1")
    before = resources()
    squash_sum = digest(images["squashfs"])
    setup = cli(*setup_args(images["squashfs"], place, "--overlay-size", "256M"))
    if backend:
        assert f"through {backend}: set by DMOVERLAY_BLOCKDEV" in setup.stderr
        assert "+ losetup --find --show --read-only" in setup.stderr
        assert "+ mount -t ext4 -- /dev/mapper/" in setup.stderr
    root = place["target"]
    assert os.readlink(root / "lib") == "usr/lib"
    assert (root / "etc/os-release").read_text() == "NAME=Sample\nID=sample\n"
    used_before = int(status(place)["used"])
    (root / "var/written").write_bytes(os.urandom(8 << 20))
    os.sync()
    used_after = int(status(place)["used"])
    assert used_after - used_before >= 8 << 20
    # an update with lib/libfoo.so, through the overlay: the link is kept
    upd = place["top"] / "upd"
    (upd / "lib").mkdir(parents=True)
    (upd / "lib/libfoo.so").write_bytes(b"fixed\n")
    run_dir = place["top"] / "run"
    run_dir.mkdir()
    cli("apply", str(upd), "--root", str(root), "--run-dir", str(run_dir))
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"fixed\n"
    assert os.readlink(root / "lib") == "usr/lib"
    down = cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))
    assert down.returncode == 0
    if backend:
        assert "+ umount -- " in down.stderr and "+ losetup --detach /dev/loop" in down.stderr
    assert resources() == before
    assert digest(images["squashfs"]) == squash_sum, "the squashfs must never change"
    again = cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))
    assert "nothing to tear down" in again.stdout


def test_status_layer_by_layer_and_for_prometheus(images: dict[str, Path],
                                                  place: dict[str, Path]) -> None:
    """What status says of each layer is what the kernel says; the same
    numbers in Prometheus' format; devices removed by hand are exit 7 and
    up 0, and teardown still clears the rest."""
    before = resources()
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M"))
    name = str(place["name"])
    ask = ["status", "--name", name, "--state-dir", str(place["state"])]
    st = status(place)
    base, ram = st["layers"]
    kernel_size = int(subprocess.run(["blockdev", "--getsize64", f"/dev/mapper/{name}-base"],
                                     capture_output=True, text=True, check=True).stdout)
    assert (base["layer"], base["size"], base["path"]) == ("base", kernel_size,
                                                           str(images["squashfs"]))
    assert (ram["layer"], ram["size"], ram["state"]) == ("ram", 64 << 20, "active")
    assert os.path.isfile(ram["path"]) and ram["ram_free"] == st["ram_free"]
    text = cli(*ask).stdout.splitlines()
    assert text[1] == f"  base  {images['squashfs']}: the image, read-only, " \
                      f"{format_size(kernel_size)}"
    assert text[2].startswith(f"  ram   {ram['path']}: changes until shutdown (RAM), ")
    metrics = prometheus(cli(*ask, "--prometheus").stdout)
    assert metrics["dmoverlay_up", ()] == 1
    assert metrics["dmoverlay_layer_size_bytes", (("layer", "base"),)] == kernel_size
    assert metrics["dmoverlay_layer_size_bytes", (("layer", "ram"),)] == 64 << 20
    assert metrics["dmoverlay_snapshot_state", (("layer", "ram"), ("state", "active"))] == 1
    # the snapshot removed by hand: status cannot ask it
    subprocess.run(["umount", str(place["target"])], check=True)
    subprocess.run(["dmsetup", "remove", f"{name}-rw"], check=True)
    gone = cli(*ask, check=False)
    assert gone.returncode == 7 and f"device {name}-rw cannot be asked" in gone.stderr
    assert prometheus(cli(*ask, "--prometheus").stdout) == {("dmoverlay_up", ()): 0}
    cli("teardown", "--name", name, "--state-dir", str(place["state"]))
    assert resources() == before


def prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by name and labels (the overlay's name left out), as a
    Prometheus parser reads them."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _unload(*modules: str) -> str:
    """Unload modules (a bare initramfs starts without them); why not, or ""."""
    result = subprocess.run(["modprobe", "-r", *modules], capture_output=True, text=True,
                            check=False)
    left = [m for m in modules if Path("/sys/module", m).is_dir()]
    return "" if not left else f"{', '.join(left)} stay loaded: {result.stderr.strip()}"


def test_setup_loads_loop_and_squashfs(images: dict[str, Path], place: dict[str, Path]) -> None:
    """As in a bare initramfs: no loop module, so no /dev/loop-control, and no
    squashfs.  Setup loads what it needs, as it does for dm-snapshot."""
    why = _unload("squashfs", "loop")
    if why:  # built in, or in use by someone else on a real host: nothing to show
        pytest.xfail(f"cannot unload the modules here ({why})")
    assert not Path("/dev/loop-control").exists()
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M"))
    assert (place["target"] / "usr/bin/tool").is_file()
    assert Path("/sys/module/loop").is_dir() and Path("/sys/module/squashfs").is_dir()


def test_disk_image(images: dict[str, Path], place: dict[str, Path]) -> None:
    cli(*setup_args(images["disk"], place, "--overlay-size", "64M"))
    assert (place["target"] / "usr/bin/tool").is_file()
    cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))


@pytest.fixture
def attached_disk(images: dict[str, Path]) -> Iterator[str]:
    """The disk image as a block device with its partitions, as a USB stick is."""
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", "--partscan",
                          str(images["disk"])], capture_output=True, text=True,
                         check=True).stdout.strip()
    subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_setup_from_a_kernel_command_line(images: dict[str, Path], place: dict[str, Path],
                                         attached_disk: str) -> None:
    """What dracut's users write on the kernel command line sets up the same
    overlay: the medium by label, the live directory and a RAM COW of
    rd.live.overlay.size MiB."""
    line = place["top"] / "cmdline"
    line.write_text("BOOT_IMAGE=/vmlinuz root=live:LABEL=DMOTEST rd.live.image "
                    "rd.live.dir=/LiveOS/ rd.live.overlay.size=48 quiet console=ttyS0\n")
    cli("setup", "--from-cmdline", str(line), "--target", str(place["target"]),
        "--name", str(place["name"]), "--state-dir", str(place["state"]))
    assert (place["target"] / "etc/os-release").is_file()
    assert int(status(place)["total"]) == 48 << 20
    cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))


@pytest.mark.parametrize("spec", ["LABEL=DMOTEST", "PARTLABEL=DMOTEST", "live:LABEL=DMOTEST"])
def test_device_spec(images: dict[str, Path], place: dict[str, Path], attached_disk: str,
                     spec: str) -> None:
    cli(*setup_args(spec, place, "--overlay-size", "32M"))
    assert (place["target"] / "etc/os-release").is_file()
    cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))


def test_spec_matching_several_devices(images: dict[str, Path], place: dict[str, Path],
                                       attached_disk: str, tmp_path: Path) -> None:
    twin = tmp_path / "twin.img"
    twin.write_bytes(images["disk"].read_bytes())
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", "--partscan",
                          str(twin)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        before = resources()
        result = cli(*setup_args("LABEL=DMOTEST", place), check=False)
        assert "matches 2 devices" in error_line(result)
        assert resources() == before
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_teardown_after_a_setup_killed_half_way(images: dict[str, Path],
                                                place: dict[str, Path], delay: float) -> None:
    before = resources()
    proc = subprocess.Popen([sys.executable, "-m", "dmoverlay", *setup_args(
        images["squashfs"], place, "--overlay-size", "32M")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))
    assert resources() == before


def test_two_overlays_side_by_side(images: dict[str, Path], tmp_path: Path) -> None:
    before = resources()
    places = []
    for n in ("a", "b"):
        target = tmp_path / n
        target.mkdir()
        name = f"two{os.getpid()}{n}"
        cli("setup", str(images["squashfs"]), "--target", str(target), "--name", name,
            "--state-dir", str(tmp_path / "state"), "--overlay-size", "32M")
        places.append((target, name))
    (places[0][0] / "only-in-a").write_text("a")
    assert not (places[1][0] / "only-in-a").exists()
    for _, name in places:
        cli("teardown", "--name", name, "--state-dir", str(tmp_path / "state"))
    assert resources() == before


def test_cow_fill_refuses_apply_then_overflows(images: dict[str, Path],
                                               place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "24M"))
    root = place["target"]
    filler = root / "var/filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(16 << 20))
        f.flush()
        os.fsync(f.fileno())
    upd = place["top"] / "upd"
    upd.mkdir()
    (upd / "big").write_bytes(os.urandom(10 << 20))
    refused = cli("apply", str(upd), "--root", str(root), "--run-dir", str(place["top"]),
                  check=False)
    assert "COW store" in error_line(refused)
    assert not (root / "big").exists()
    monitor = cli("status", "--name", str(place["name"]), "--state-dir", str(place["state"]),
                  "--threshold", "50", check=False)
    assert monitor.returncode == 3, monitor.stdout
    # past full: a PO snapshot overflows; writes fail, reads go on
    with pytest.raises(OSError):
        write_until_it_fails(root / "var/more", 64)
    over = cli("status", "--name", str(place["name"]), "--state-dir", str(place["state"]),
               check=False)
    assert over.returncode == 4 and "overflow" in over.stdout
    assert (root / "etc/os-release").read_text().startswith("NAME=Sample")


def _faulty_cases(top: Path, images: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    plain = top / "plain.img"
    subprocess.run(["mksquashfs", str(images["tree"]), str(plain), "-quiet", "-noappend",
                    "-comp", "zstd"], check=True, capture_output=True)
    cut = top / "cut.img"
    whole = images["squashfs"].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    return {
        "no rootfs": ([str(plain)], "no LiveOS/rootfs.img"),
        "truncated": ([str(cut)], "truncated"),
        "no match": (["LABEL=no-such-label-dmo"], "no device matches"),
        "missing": ([str(top / "none.img")], "no such file"),
    }


@pytest.mark.parametrize("case", ["no rootfs", "truncated", "no match", "missing"])
def test_faults_release_everything(images: dict[str, Path], place: dict[str, Path],
                                   case: str) -> None:
    args, words = _faulty_cases(place["top"], images)[case]
    before = resources()
    result = cli(*setup_args(args[0], place), check=False)
    assert words in error_line(result)
    assert resources() == before
    assert not list(place["state"].glob("*.json")) if place["state"].exists() else True


def test_target_not_empty_and_name_in_use(images: dict[str, Path],
                                          place: dict[str, Path]) -> None:
    (place["target"] / "x").write_text("x")
    assert "not an empty directory" in error_line(cli(*setup_args(images["squashfs"], place),
                                                      check=False))
    (place["target"] / "x").unlink()
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "16M"))
    other = place["top"] / "other"
    other.mkdir()
    before = resources()
    again = cli("setup", str(images["squashfs"]), "--target", str(other), "--name",
                str(place["name"]), "--state-dir", str(place["state"]), check=False)
    assert "exists already" in error_line(again)
    assert resources() == before


def test_tmpfs_too_small(images: dict[str, Path], place: dict[str, Path]) -> None:
    small = place["top"] / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        before = resources()
        result = cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M",
                                 "--tmpfs-dir", str(small)), check=False)
        assert "too little" in error_line(result)
        assert resources() == before
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_teardown_says_what_is_busy(images: dict[str, Path], place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "16M"))
    holder = subprocess.Popen(["sleep", "60"], cwd=place["target"])
    try:
        busy = cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]),
                   check=False)
        assert "busy" in error_line(busy) and "sleep" in busy.stderr
    finally:
        holder.kill()
        holder.wait()
    cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))


def _tmpfs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_thin_overlay_gives_ram_back(images: dict[str, Path], place: dict[str, Path]) -> None:
    """rd.live.overlay.thin: what is deleted and trimmed leaves the thin pool and
    its tmpfs, which a snapshot's COW never gives back."""
    before = resources()
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M", "--overlay-thin"))
    root = place["target"]
    ram = place["state"] / str(place["name"]) / "cow"
    st = status(place)
    assert (st["thin"], st["state"], st["total"]) == (True, "active", 64 << 20)
    (root / "var/big").write_bytes(os.urandom(16 << 20))
    os.sync()
    used, ram_used = int(status(place)["used"]), _tmpfs_used(ram)
    assert used >= 16 << 20 and ram_used >= 16 << 20
    (root / "var/big").unlink()
    os.sync()  # ext4 frees a deleted file's blocks when its journal commits
    subprocess.run(["fstrim", str(root)], check=True, capture_output=True)
    os.sync()
    assert int(status(place)["used"]) < used - (12 << 20)
    assert _tmpfs_used(ram) < ram_used - (12 << 20)
    assert (root / "etc/os-release").read_text() == "NAME=Sample\nID=sample\n"
    cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))
    assert resources() == before


def test_thin_overlay_full_fails_writes_not_reads(images: dict[str, Path],
                                                   place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "16M", "--overlay-thin"))
    root = place["target"]
    with pytest.raises(OSError):
        write_until_it_fails(root / "var/more", 32)
    full = cli("status", "--name", str(place["name"]), "--state-dir", str(place["state"]),
               check=False)
    assert full.returncode == 4 and "full" in full.stdout, full.stdout
    assert (root / "etc/os-release").read_text().startswith("NAME=Sample")


# ------------------------------------------------------------------ copy to RAM (rd.live.ram)


def _loop_backings() -> dict[str, str]:
    return {p.parent.parent.name: p.read_text().strip()
            for p in Path("/sys/block").glob("loop*/loop/backing_file")}


def _gone_from_loops(backing: str) -> bool:
    """No loop device holds `backing`, within 5 s: a loop device still open
    (udev probing it a moment) is detached by the kernel at its last close."""
    for _ in range(50):
        if backing not in _loop_backings().values():
            return True
        time.sleep(0.1)
    return False


def _drop_caches() -> None:
    """What is read next comes from the devices, not from the page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _check_writable_root(root: Path) -> None:
    _drop_caches()
    assert (root / "etc/os-release").read_text() == "NAME=Sample\nID=sample\n"
    assert (root / "usr/bin/tool").is_file()
    (root / "var/written").write_bytes(b"x" * (1 << 20))
    os.sync()
    _drop_caches()
    assert (root / "var/written").read_bytes() == b"x" * (1 << 20)


def test_ram_copies_the_image_and_releases_the_medium(images: dict[str, Path],
                                                     place: dict[str, Path]) -> None:
    """--ram over a disk image: setup attaches its partition on a loop device
    and mounts it to reach LiveOS/squashfs.img; once the copy in RAM holds
    everything, that loop device is detached and the mount gone, before
    setup ends; teardown then finds nothing of the medium to undo."""
    before = resources()
    disk = os.path.realpath(images["disk"])
    cli(*setup_args(images["disk"], place, "--overlay-size", "64M", "--ram"))
    name, work = str(place["name"]), place["state"] / str(place["name"])
    assert _gone_from_loops(disk), "the medium's loop device is still attached"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert not [m for m in mounts if m.startswith(f"{work}/media")], mounts
    assert not list(work.glob("media*"))
    assert f"{work}/ram" in mounts
    state = json.loads((place["state"] / f"{name}.json").read_text())
    assert state["ram_copy"] > 0 and state["complete"] is True
    assert not [s for s in state["steps"] if disk in (s["what"], s["backing"])]
    assert status(place)["ram_copy"] == state["ram_copy"]
    _check_writable_root(place["target"])
    cli("teardown", "--name", name, "--state-dir", str(place["state"]))
    assert resources() == before


def test_rd_live_ram_lets_the_medium_be_removed(images: dict[str, Path],
                                               place: dict[str, Path]) -> None:
    """rd.live.ram on a kernel command line, the medium a block device found
    by its label (as a USB stick): after setup nothing holds it, so it can
    be taken away (here: its loop device detached, which the kernel defers
    while anything holds it) and the root goes on working from RAM."""
    before = resources()
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", "--partscan",
                          str(images["disk"])], capture_output=True, text=True,
                         check=True).stdout.strip()
    subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
    attached = True
    try:
        line = place["top"] / "cmdline"
        line.write_text("root=live:LABEL=DMOTEST rd.live.image rd.live.ram "
                        "rd.live.overlay.size=48 console=ttyS0\n")
        cli("setup", "--from-cmdline", str(line), "--target", str(place["target"]),
            "--name", str(place["name"]), "--state-dir", str(place["state"]))
        part = Path("/sys/class/block") / f"{Path(dev).name}p1"
        devno = part.joinpath("dev").read_text().strip()
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        assert not [m for m in mountinfo if m.split()[2] == devno], "the medium is mounted"
        assert not list(part.joinpath("holders").iterdir())
        subprocess.run(["losetup", "-d", dev], check=True)
        attached = False
        assert _gone_from_loops(os.path.realpath(images["disk"])), \
            f"{dev} stays attached: something still holds the medium"
        _check_writable_root(place["target"])
        assert int(status(place)["total"]) == 48 << 20
        cli("teardown", "--name", str(place["name"]), "--state-dir", str(place["state"]))
    finally:
        if attached:
            subprocess.run(["losetup", "-d", dev], check=False)
    assert resources() == before


def test_ram_that_does_not_fit_is_refused_before_the_copy(images: dict[str, Path],
                                                         place: dict[str, Path]) -> None:
    before = resources()
    result = cli(*setup_args(images["disk"], place, "--overlay-size", "64G", "--ram"),
                 check=False)
    assert "not enough RAM to copy the image" in error_line(result)
    assert "hint: give a smaller --overlay-size" in result.stderr
    assert resources() == before


def _wait_for(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"the watch never said {text!r}: {log.read_text()}"
        time.sleep(0.2)


def test_watch_says_each_threshold_once_then_the_overflow_then_the_end(
        images: dict[str, Path], place: dict[str, Path]) -> None:
    """`dmoverlay watch` on a real snapshot filling up, its stderr standing
    for the journal's stream (JOURNAL_STREAM names it): a line per threshold
    passed, the overflow once at priority 0, and the end after teardown."""
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "24M"))
    log = place["top"] / "watch.log"
    with open(log, "w") as out:
        st = os.fstat(out.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        watcher = subprocess.Popen(
            [sys.executable, "-m", "dmoverlay", "watch", "--name", str(place["name"]),
             "--state-dir", str(place["state"]), "--thresholds", "40,60,80",
             "--interval", "0.1"], stderr=out, env=env)
        try:
            # in steps, each seen by the watch before the next: under
            # emulation its start alone can take longer than filling up
            root = place["target"]
            with open(root / "var/filler", "wb") as f:
                for mib, seen in ((12, " past 40%"), (8, " past 80%")):
                    f.write(os.urandom(mib << 20))
                    f.flush()
                    os.fsync(f.fileno())
                    _wait_for(log, seen)
            with pytest.raises(OSError):
                write_until_it_fails(root / "var/more", 64)
            _wait_for(log, "<0>")
            teardown(place)
            assert watcher.wait(timeout=60) == 0
        finally:
            if watcher.poll() is None:
                watcher.kill()
    lines = log.read_text().splitlines()
    ups = [line for line in lines if line.startswith(("<4>", "<2>")) and " past " in line]
    passed = [line.split(" past ")[1].split("%")[0] for line in ups]
    assert passed and passed == sorted(set(passed), key=float), lines  # each once, in order
    assert passed[-1] == "80" and ups[-1].startswith("<2>"), lines  # the last: critical
    # before the overflow, every look read the fill
    assert not [line for line in lines[:lines.index(next(x for x in lines if x.startswith("<0>")))]
                if "cannot read" in line], lines
    assert [line for line in lines if line.startswith("<0>")] == \
        [f"<0>{place['name']}: the COW is overflow: writes on it fail"], lines
    assert lines[-1] == f"<5>{place['name']}: no overlay (torn down, or never set up): " \
                        "the watch ends", lines
