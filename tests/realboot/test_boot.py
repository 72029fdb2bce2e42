"""Boots of the stock Debian kernel with stock dracut and the dmoverlay
module, each checked from inside by the probe root's init (machine.py)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apply.readers.httpkit import free_port
from tests.realboot import machine
from tests.realboot.machine import Boot
from tests.signkit import KeyPair, make_key, sign_as

Kit = dict[str, Path | str]
LIVE = "root=live:LABEL=LIVE"
PART1 = 2048 * 512  # where `build --disk` puts the live partition


def _boot(kit: Kit, tmp_path: Path, cmdline: str, disks: list[Path] | None = None,
          *, name: str = "console", timeout: float = 300, initrd: Path | None = None,
          network: bool = False) -> Boot:
    log = tmp_path / f"{name}.log"
    result = machine.boot(Path(kit["kernel"]), initrd or Path(kit["initrd"]), cmdline,
                          disks or [Path(kit["disk"])], log=log, timeout=timeout,
                          snapshot=disks is None, network=network)
    assert result.ended, f"the boot did not end within {timeout} s: see {log}"
    return result


def _booted_live(result: Boot) -> None:
    """/ is dmoverlay's live-rw, the probe ran on it, and /lib is still a link."""
    assert result.probe, "the probe never ran:\n" + result.console[-3000:]
    assert result.root_mount[:2] == ["/dev/mapper/live-rw", "ext4"], result.root_mount
    assert "rw" in result.root_mount[2].split(",")
    assert "link /lib usr/lib" in result.probe


def _copy(disk: Path, to: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(disk), str(to)], check=True)
    return to


def _tar(members: dict[str, bytes], *, cut: int | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data[:cut] if cut is not None else data


def _put_on_medium(disk: Path, files: dict[str, bytes], scratch: Path) -> None:
    """Files written into the live partition's ext4, as someone copying
    updates onto a live stick does."""
    for name, data in files.items():
        src = scratch / name.strip("/").replace("/", "_")
        src.write_bytes(data)
        subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", f"{disk}?offset={PART1}"],
                       check=True, capture_output=True)


def test_ram_overlay(kit: Kit, tmp_path: Path) -> None:
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 probe.touch=/written")
    _booted_live(result)
    assert {"dm live-rw", "dm live-base"} <= set(result.has("dm "))
    tables = result.tables()
    rw = tables["live-rw"].split()
    assert rw[2] == "snapshot" and rw[-2:] == ["PO", "8"], tables
    assert rw[4].startswith("7:"), f"the COW is not a loop device (on its RAM file): {rw}"
    assert tables["live-base"].split()[2:4] == ["linear", rw[3]], tables
    assert "touched /written" in result.probe


def test_bad_command_line_is_one_message_and_the_machine_stops(kit: Kit,
                                                              tmp_path: Path) -> None:
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=lots", timeout=240)
    assert not result.probe
    errors = [line for line in result.console.splitlines() if line.startswith("error: ")]
    assert errors == ["error: kernel command line: rd.live.overlay.size=lots: not a size in "
                      "MiB"] or (len(errors) == 1 and "rd.live.overlay.size" in errors[0]), \
        result.console[-3000:]
    assert "Traceback" not in result.console


def test_persistent_overlay_across_boots_and_its_read_only_variant(kit: Kit,
                                                                   tmp_path: Path) -> None:
    disk = _copy(Path(kit["disk"]), tmp_path / "disk.img")
    store = "rd.live.overlay=/dev/vda2"
    first = _boot(kit, tmp_path, f"{LIVE} {store} probe.write=first", [disk], name="first")
    _booted_live(first)
    assert "wrote first" in first.probe
    # dracut's table: the store persistent, with overflow reported ("PO"), chunks of 8 sectors
    rw = first.tables()["live-rw"].split()
    assert rw[2] == "snapshot" and rw[-2:] == ["PO", "8"], rw
    assert not rw[4].startswith("7:"), f"the store is a loop device, not /dev/vda2: {rw}"
    again = _boot(kit, tmp_path, f"{LIVE} {store} rd.live.overlay.readonly "
                  "probe.cat=/probe-written probe.write=second", [disk], name="readonly")
    _booted_live(again)
    assert "file /probe-written first" in again.probe
    assert "wrote second" in again.probe  # into RAM, above the store shown read-only
    assert "dm live-ro" in again.has("dm ")
    last = _boot(kit, tmp_path, f"{LIVE} {store} probe.cat=/probe-written", [disk],
                 name="last")
    _booted_live(last)
    assert "file /probe-written first" in last.probe  # the read-only boot's write is gone


def test_thin_overlay(kit: Kit, tmp_path: Path) -> None:
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 rd.live.overlay.thin "
                   "probe.touch=/written")
    _booted_live(result)
    assert "dm live-overlay-pool" in result.has("dm ")
    assert result.tables()["live-overlay-pool"].split()[2] == "thin-pool"
    assert "touched /written" in result.probe


def test_rd_live_ram_lets_the_medium_go(kit: Kit, tmp_path: Path) -> None:
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.ram rd.live.overlay.size=64 "
                   "probe.touch=/written")
    _booted_live(result)
    assert not [m for m in result.has("mount ") if m.split()[1].startswith("/dev/vda")], \
        result.has("mount ")
    assert not [loop for loop in result.has("loop ") if "/dev/vda" in loop]
    assert "touched /written" in result.probe


def test_updates_from_the_medium_and_a_device_and_a_broken_one(kit: Kit,
                                                               tmp_path: Path) -> None:
    """Three updates in turn: one on the medium, one on a labelled disk,
    one broken.  Both good ones land through lib -> usr/lib; the broken one
    is left out whole, the boot goes on, and the console says why."""
    disk = _copy(Path(kit["disk"]), tmp_path / "disk.img")
    _put_on_medium(disk, {
        "/updates.tar": _tar({"lib/dmoverlay-update.txt": b"from-the-medium\n"}),
        "/broken.tar": _tar({"lib/broken-first.txt": b"first\n",
                             "lib/broken-second.txt": b"x" * 5000}, cut=3000),
    }, tmp_path)
    tree = tmp_path / "upd"
    tree.mkdir()
    (tree / "upd2.tar").write_bytes(_tar({"lib/dmoverlay-update2.txt": b"from-a-device\n"}))
    updates = tmp_path / "updates.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "UPDATES", "-d", str(tree), str(updates), "8M"],
                   check=True)
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 "
                   "rd.live.updates=/updates.tar inst.updates=LABEL=UPDATES:/upd2.tar "
                   "rd.live.updates=/broken.tar probe.cat=/usr/lib/dmoverlay-update.txt "
                   "probe.cat=/usr/lib/dmoverlay-update2.txt "
                   "probe.cat=/usr/lib/broken-first.txt", [disk, updates])
    _booted_live(result)
    assert "file /usr/lib/dmoverlay-update.txt from-the-medium" in result.probe
    assert "file /usr/lib/dmoverlay-update2.txt from-a-device" in result.probe
    assert "nofile /usr/lib/broken-first.txt" in result.probe
    said = [line for line in result.console.splitlines()
            if "dmoverlay: warning: left out /broken.tar" in line]
    assert said, result.console[-4000:]



def test_the_same_image_boots_under_dracuts_own_dmsquash_live(kit: Kit, tmp_path: Path,
                                                              dmsquash_initrd: Path) -> None:
    """Interoperability: what `dmoverlay build --disk` makes is what stock
    dmsquash-live boots, unchanged, with the same command line."""
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 probe.touch=/written",
                   initrd=dmsquash_initrd)
    _booted_live(result)
    assert result.tables()["live-rw"].split()[2] == "snapshot"
    assert "touched /written" in result.probe


def test_a_systemd_initramfs(kit: Kit, tmp_path: Path, systemd_initrd: Path) -> None:
    """The hooks run from dracut's systemd services the same way; an update
    applied at pre-pivot is there after switch_root."""
    disk = _copy(Path(kit["disk"]), tmp_path / "disk.img")
    _put_on_medium(disk, {"/updates.tar": _tar({"lib/dmoverlay-update.txt": b"systemd\n"})},
                   tmp_path)
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 rd.live.updates=/updates.tar "
                   "probe.cat=/usr/lib/dmoverlay-update.txt", [disk], initrd=systemd_initrd)
    _booted_live(result)
    assert "file /usr/lib/dmoverlay-update.txt systemd" in result.probe


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """(a directory, the port) served over http on this host's loopback,
    which a guest on qemu's user-mode network reaches as 10.0.2.2."""
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_an_update_over_http(kit: Kit, tmp_path: Path, network_initrd: Path,
                             http_dir: tuple[Path, int]) -> None:
    """inst.updates= an http URL, from a server on the host; one that is
    not there (404) is left out and the boot goes on."""
    served, port = http_dir
    (served / "updates.tar").write_bytes(_tar({"lib/dmoverlay-update.txt": b"over-http\n"}))
    url = f"http://10.0.2.2:{port}"
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 rd.neednet=1 ip=dhcp "
                   f"inst.updates={url}/updates.tar rd.live.updates={url}/missing.tar "
                   "probe.cat=/usr/lib/dmoverlay-update.txt", initrd=network_initrd,
                   network=True)
    _booted_live(result)
    assert "file /usr/lib/dmoverlay-update.txt over-http" in result.probe
    assert [line for line in result.console.splitlines()
            if f"left out {url}/missing.tar" in line], result.console[-4000:]


def test_signed_updates_over_http_with_a_mirror(kit: Kit, tmp_path: Path, signed_initrd: Path,
                                               update_key: KeyPair,
                                               http_dir: tuple[Path, int]) -> None:
    """tree -> `mkupdates --sign` -> http -> verified and applied at boot,
    by an initramfs that holds the key (dracut.conf's dmoverlay_updates_keys):
    the first URL is down, its mirror serves it, its checksum is checked.
    An update signed by no trusted key, and one changed after it was signed,
    are left out; so is one named by https, which this initramfs (made with
    dmoverlay_https=no) cannot speak."""
    served, port = http_dir
    tree = tmp_path / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/dmoverlay-signed.txt").write_text("signed\n")
    good = served / "good.img"
    subprocess.run([str(machine.PYTHON), "-m", "dmoverlay", "-q", "mkupdates", str(tree),
                    "-o", str(good), "--all-root", "--sign", str(update_key.private)],
                   check=True, env={**os.environ, "PYTHONPATH": str(machine.TOP)})
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    other = make_key(tmp_path / "keys", "stranger")
    (served / "stranger.tar").write_bytes(_tar({"lib/dmoverlay-stranger.txt": b"no\n"}))
    sign_as(served / "stranger.tar", other, "dmoverlay-updates")
    (served / "changed.tar").write_bytes(_tar({"lib/dmoverlay-changed.txt": b"before\n"}))
    sign_as(served / "changed.tar", update_key, "dmoverlay-updates")
    (served / "changed.tar").write_bytes(_tar({"lib/dmoverlay-changed.txt": b"after!\n"}))
    url = f"http://10.0.2.2:{port}"
    down = f"http://10.0.2.2:{free_port()}"
    result = _boot(kit, tmp_path, f"{LIVE} rd.live.overlay.size=64 rd.neednet=1 ip=dhcp "
                   f"rd.live.updates={down}/good.img,{url}/good.img#sha256={digest} "
                   f"rd.live.updates={url}/stranger.tar rd.live.updates={url}/changed.tar "
                   f"rd.live.updates=https://10.0.2.2:{port}/good.img "
                   "probe.cat=/usr/lib/dmoverlay-signed.txt "
                   "probe.cat=/usr/lib/dmoverlay-stranger.txt "
                   "probe.cat=/usr/lib/dmoverlay-changed.txt",
                   initrd=signed_initrd, network=True)
    _booted_live(result)
    assert "file /usr/lib/dmoverlay-signed.txt signed" in result.probe
    assert "nofile /usr/lib/dmoverlay-stranger.txt" in result.probe
    assert "nofile /usr/lib/dmoverlay-changed.txt" in result.probe
    left = [line for line in result.console.splitlines() if "left out" in line]
    assert any(f"{url}/stranger.tar" in line for line in left), left
    assert any(f"{url}/changed.tar" in line for line in left), left
    assert any(f"https://10.0.2.2:{port}/good.img" in line and "has no TLS" in line
               for line in left), left
