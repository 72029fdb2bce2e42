"""A persistent overlay, decided without the kernel: --overlay's text, dracut's
auto path, store headers and sizes."""

from __future__ import annotations

import re
import struct

import pytest

from dmoverlay.core.errors import ImageError, UsageError
from dmoverlay.core.sizes import MiB
from dmoverlay.overlay import persistent


@pytest.mark.parametrize(("text", "device", "path"), [
    ("LABEL=LIVE:/LiveOS/overlay-LIVE", "LABEL=LIVE", "/LiveOS/overlay-LIVE"),
    ("UUID=12-ab:/a//b/", "UUID=12-ab", "/a/b"),
    ("PARTLABEL=LIVE-overlay", "PARTLABEL=LIVE-overlay", None),
    ("CDLABEL=X:auto", "CDLABEL=X", None),
    ("/dev/sdb2:/overlay", "/dev/sdb2", "/overlay"),
    ("/dev/sdb2", "/dev/sdb2", None),
    ("/dev/disk/by-path/pci-0000:00:1f.2-part2", "/dev/disk/by-path/pci-0000:00:1f.2-part2",
     None),
    ("/dev/disk/by-path/pci-0000:00:1f.2-part2:/o", "/dev/disk/by-path/pci-0000:00:1f.2-part2",
     "/o"),
    ("fs.img:/LiveOS/o", "fs.img", "/LiveOS/o"),
    ("/var/tmp/live.overlay", None, "/var/tmp/live.overlay"),
    ("./a=b/overlay", None, "./a=b/overlay"),
])
def test_overlay_specs(text: str, device: str | None, path: str | None) -> None:
    spec = persistent.parse_spec(text)
    assert (spec.device, spec.path) == (device, path)


@pytest.mark.parametrize("text", ["", "LABEL=:/x", "LABEL=X:relative", "/dev/sdb:/a/../b",
                                  "LABEL=X:/.."])
def test_bad_overlay_specs(text: str) -> None:
    with pytest.raises(UsageError):
        persistent.parse_spec(text)


def test_auto_path_is_dracuts() -> None:
    assert persistent.auto_path("LiveOS", "LIVE", "1234") == "/LiveOS/overlay-LIVE-1234"
    assert persistent.auto_path("LiveOS", "", "1234") == "/LiveOS/overlay--1234"
    with pytest.raises(UsageError, match="neither"):  # an image file: no medium to name
        persistent.auto_path("LiveOS", "", "")


def _header(magic: bytes = b"SnAp", valid: int = 1, version: int = 1, chunk: int = 8) -> bytes:
    return magic + struct.pack("<III", valid, version, chunk) + bytes(4080)


def test_store_headers() -> None:
    assert persistent.read_header(bytes(4096), where="f").state is persistent.Store.NEW
    assert persistent.read_header(_header(chunk=16), where="f") == \
        persistent.StoreHeader(persistent.Store.VALID, 16)
    cases = {
        "not a snapshot overlay store (unknown content)": _header(magic=b"junk"),
        "marked this overlay store invalid": _header(valid=0),
        "unsupported snapshot store": _header(version=2),
        "chunk size 12 sectors": _header(chunk=12),
        "too short": b"SnAp",
    }
    for words, head in cases.items():
        with pytest.raises(ImageError, match=re.escape(words)):
            persistent.read_header(head, where="f")
    ext = bytearray(4096)  # ext4 starts with a zero boot block: a zero magic
    ext[1024 + 0x38:1024 + 0x3A] = b"\x53\xef"
    with pytest.raises(ImageError, match="holds ext data") as info:
        persistent.read_header(bytes(ext), where="f")
    assert info.value.hint and "--overlay-reset" in info.value.hint
    with pytest.raises(ImageError, match="holds xfs data"):
        persistent.read_header(bytes(4096), where="f", probed="xfs")
    assert persistent.read_header(_header(), where="f", probed="DM_snapshot_cow").state is \
        persistent.Store.VALID


def test_store_sizes() -> None:
    persistent.check_size(64 * MiB, wanted=None, where="f")
    persistent.check_size(64 * MiB, wanted=64 * MiB, where="f")
    with pytest.raises(UsageError, match="not the --overlay-size"):
        persistent.check_size(64 * MiB, wanted=128 * MiB, where="f")
    with pytest.raises(ImageError, match="too small"):
        persistent.check_size(4096, wanted=None, where="f")
    with pytest.raises(ImageError, match="whole number of sectors"):
        persistent.check_size(MiB + 100, wanted=None, where="f")
    assert persistent.new_size(64 * MiB + 5, where="f") == 64 * MiB
    with pytest.raises(UsageError, match="no such overlay file") as info:
        persistent.new_size(None, where="f")
    assert info.value.hint and "--overlay-size" in info.value.hint
    with pytest.raises(UsageError, match="too small"):
        persistent.new_size(1000, where="f")
