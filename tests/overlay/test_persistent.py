"""A persistent overlay, decided without the kernel: --overlay's text, dracut's
auto path, store headers and sizes."""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.core.errors import ImageError, UsageError
from dmoverlay.core.sizes import MiB
from dmoverlay.overlay import devspec, persistent


def _nothing(path: str) -> persistent.Found:
    return persistent.Found(persistent.What.MISSING)


@pytest.mark.parametrize(("text", "device", "path"), [
    ("LABEL=LIVE:/LiveOS/overlay-LIVE", "LABEL=LIVE", "/LiveOS/overlay-LIVE"),
    ("UUID=12-ab:/a//b/", "UUID=12-ab", "/a/b"),
    ("PARTLABEL=LIVE-overlay", "PARTLABEL=LIVE-overlay", None),
    ("CDLABEL=X:auto", "CDLABEL=X", None),
    ("LABEL=X:/a:/b", "LABEL=X", "/a:/b"),
    ("label=X:/o", "label=X", "/o"),
    ("live:LABEL=X:/o", "live:LABEL=X", "/o"),
    ("/dev/sdb2:/overlay", "/dev/sdb2", "/overlay"),
    ("/dev/sdb2", "/dev/sdb2", None),
    ("/dev/sdb2:", "/dev/sdb2", None),
    ("/dev/sdb2:auto", "/dev/sdb2", None),
    ("/dev/sdb2:/x:/o", "/dev/sdb2", "/x:/o"),  # the first ':/' after the device
    ("/dev/disk/by-path/pci-0000:00:1f.2-part2", "/dev/disk/by-path/pci-0000:00:1f.2-part2",
     None),
    ("/dev/disk/by-path/pci-0000:00:1f.2-part2:/o", "/dev/disk/by-path/pci-0000:00:1f.2-part2",
     "/o"),
    ("/var/tmp/live.overlay", None, "/var/tmp/live.overlay"),
    ("./a=b/overlay", None, "./a=b/overlay"),
    # no device before the ':/': a path with ':/' in it, as written
    ("/srv/a:/b/overlay", None, "/srv/a:/b/overlay"),
    ("a:/b", None, "a:/b"),
])
def test_overlay_specs(text: str, device: str | None, path: str | None) -> None:
    """Decided by the text alone: nothing on disk at any of the paths."""
    spec = persistent.parse_spec(text, probe=_nothing)
    assert (spec.device, spec.path) == (device, path)


@pytest.mark.parametrize("text", ["", "LABEL=:/x", "LABEL=X:relative", "/dev/sdb:/a/../b",
                                  "LABEL=X:/..", "SERIAL=12:/o", "fs.img:auto", "fs.img:"])
def test_bad_overlay_specs(text: str) -> None:
    with pytest.raises(UsageError):
        persistent.parse_spec(text, probe=_nothing)


def _filesystem(path: Path, kind: str) -> Path:
    """A real filesystem image of `kind`, made by its own tool."""
    tree = path.parent / f"{path.name}.tree"
    tree.mkdir()
    (tree / "LiveOS").mkdir()
    commands = {
        "ext": ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), "2M"],
        "iso9660": ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(path), str(tree)],
        "squashfs": ["mksquashfs", str(tree), str(path), "-quiet", "-noappend"],
    }
    subprocess.run(commands[kind], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("kind", ["ext", "iso9660", "squashfs"])
def test_a_filesystem_image_is_no_store_and_the_message_names_its_auto_path(
        tmp_path: Path, kind: str) -> None:
    """`--overlay medium.img` meaning the medium's auto overlay: refused,
    pointing to medium.img:auto, not taken for the store (its size refused,
    then a reset that would wipe the medium)."""
    medium = os.fspath(_filesystem(tmp_path / "medium.img", kind))
    words = f"holds a filesystem ({kind}), not an overlay store"
    with pytest.raises(UsageError, match=re.escape(words)) as info:
        persistent.parse_spec(medium)
    assert info.value.hint and f"{medium}:auto" in info.value.hint
    spec = persistent.parse_spec(f"{medium}:auto")
    assert (spec.device, spec.path) == (medium, None)
    spec = persistent.parse_spec(f"{medium}:/LiveOS/o")
    assert (spec.device, spec.path) == (medium, "/LiveOS/o")


def test_colon_slash_splits_only_after_a_device(tmp_path: Path) -> None:
    """`DIR/a:/overlay`: a file in the directory `a:` unless `a` holds a
    filesystem; and a file that exists as a whole is that file."""
    (tmp_path / "a:").mkdir()
    text = f"{tmp_path}/a:/overlay"
    assert persistent.parse_spec(text).path == text  # nothing at a: a path
    _filesystem(tmp_path / "a", "ext")
    spec = persistent.parse_spec(text)
    assert (spec.device, spec.path) == (f"{tmp_path}/a", "/overlay")
    (tmp_path / "a:" / "overlay").write_bytes(bytes(MiB))
    spec = persistent.parse_spec(text)
    assert (spec.device, spec.path) == (None, text)  # it exists: that file


def test_a_later_colon_slash_splits_after_the_device(tmp_path: Path) -> None:
    (tmp_path / "x:").mkdir()
    _filesystem(tmp_path / "x:" / "fs.img", "ext")
    spec = persistent.parse_spec(f"{tmp_path}/x:/fs.img:/o")
    assert (spec.device, spec.path) == (f"{tmp_path}/x:/fs.img", "/o")


def test_a_file_without_a_filesystem_before_colon_slash_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(bytes(64 * 1024))
    with pytest.raises(UsageError, match=r"data\.bin holds no filesystem to keep /o in"):
        persistent.parse_spec(f"{tmp_path}/data.bin:/o")
    with pytest.raises(UsageError, match=r"data\.bin holds no filesystem to keep the overlay"):
        persistent.parse_spec(f"{tmp_path}/data.bin:auto")
    with pytest.raises(UsageError, match=r"missing\.img is not a device nor a filesystem image"):
        persistent.parse_spec(f"{tmp_path}/missing.img:auto")
    with pytest.raises(UsageError, match="is not a device nor a filesystem image"):
        persistent.parse_spec(f"{tmp_path}:")  # a directory


def test_a_block_device_named_whole_is_the_device(tmp_path: Path) -> None:
    node = tmp_path / "stick"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    spec = persistent.parse_spec(os.fspath(node))
    assert (spec.device, spec.path) == (os.fspath(node), None)
    spec = persistent.parse_spec(f"{node}:/LiveOS/o")
    assert (spec.device, spec.path) == (os.fspath(node), "/LiveOS/o")


def test_probe_never_opens_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert persistent.probe_path(os.fspath(fifo)).what is persistent.What.OTHER
    assert persistent.parse_spec(os.fspath(fifo)).path == os.fspath(fifo)  # no hang
    assert persistent.probe_path(os.fspath(tmp_path / "none")).what is persistent.What.MISSING


def test_filesystem_in_reads_a_fat_boot_sector() -> None:
    head = bytearray(4096)
    head[0x52:0x5A] = b"FAT32   "
    head[510:512] = b"\x55\xaa"
    assert persistent.filesystem_in(bytes(head)) == "vfat"
    head[0x52:0x5A] = bytes(8)  # a partition table ends the same way
    assert persistent.filesystem_in(bytes(head)) == ""
    assert persistent.filesystem_in(_header()) == ""  # a store holds none


_PIECES = st.sampled_from(["a", "/", ":", ":/", "auto", "LABEL=", "/dev/", "x", "=", "."])


@given(st.lists(_PIECES, min_size=1, max_size=8).map("".join), st.sets(st.integers(0, 8)))
def test_a_split_is_the_text_cut_in_two(text: str, devices: set[int]) -> None:
    """Whatever the text and whichever paths are devices: a split is the text
    cut once at a ':' the rule names, never a text that exists as a whole,
    and a FILE is the text as written."""
    heads = [h for h, _ in persistent._splits(text)]
    device_heads = {heads[i] for i in devices if i < len(heads)}

    def probe(path: str) -> persistent.Found:
        if path in device_heads:
            return persistent.Found(persistent.What.FILE, "ext")
        return persistent.Found(persistent.What.MISSING)

    try:
        spec = persistent.parse_spec(text, probe=probe)
    except UsageError:
        return
    if spec.device is None:
        assert spec.path == text
    elif not devspec.looks_like_spec(text):
        rest = text[len(spec.device):]
        assert rest in ("", ":", ":auto") or rest.startswith(":/")
        if not os.path.normpath(text).startswith("/dev/"):  # else decided by the text
            assert spec.device in device_heads
            assert heads.index(spec.device) == min(heads.index(h) for h in device_heads)


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


# ------------------------------------------------ the store's exception table


def _store_bytes(chunk: int, areas: list[list[tuple[int, int]]], chunks: int) -> bytes:
    """A store of `chunks` chunks of `chunk` bytes whose metadata areas hold
    `areas` (each padded with zeros: a zero store chunk ends the table)."""
    data = bytearray(chunk * chunks)
    data[:16] = struct.pack("<4sIII", b"SnAp", 1, 1, chunk // 512)
    per_area = chunk // 16
    for i, entries in enumerate(areas):
        at = (1 + i * (per_area + 1)) * chunk
        for j, (old, new) in enumerate(entries):
            struct.pack_into("<QQ", data, at + 16 * j, old, new)
    return bytes(data)


def _read(store: bytes, chunk: int) -> Callable[[int], bytes]:
    return lambda n: store[n * chunk:(n + 1) * chunk]


def test_the_exception_table_is_read_area_by_area() -> None:
    """512-byte chunks: 32 entries an area, its data chunks after it; the
    second area starts at chunk 34."""
    first = [(100 + i, 2 + i) for i in range(32)]
    second = [(7, 35), (3, 36)]
    store = _store_bytes(512, [first, second], 80)
    got = persistent.exceptions(_read(store, 512), chunk_bytes=512, store_chunks=80,
                                base_chunks=1000, where="s")
    assert got == first + second


def test_an_empty_store_has_no_exceptions() -> None:
    store = _store_bytes(4096, [[]], 16)
    assert persistent.exceptions(_read(store, 4096), chunk_bytes=4096, store_chunks=16,
                                 base_chunks=8, where="s") == []


def test_a_full_store_ends_at_its_end() -> None:
    first = [(i, 2 + i) for i in range(32)]
    store = _store_bytes(512, [first], 34)
    assert persistent.exceptions(_read(store, 512), chunk_bytes=512, store_chunks=34,
                                 base_chunks=64, where="s") == first


@pytest.mark.parametrize(("entry", "base_chunks"), [
    ((5, 1), 100),  # the area's own chunk
    ((5, 40), 100),  # past the area's 32 data chunks
    ((5, 3), 5),  # past the base
])
def test_an_entry_outside_its_area_or_the_base_is_damage(entry: tuple[int, int],
                                                         base_chunks: int) -> None:
    store = _store_bytes(512, [[(1, 2), entry]], 80)
    with pytest.raises(ImageError, match="damaged store: entry 1 maps"):
        persistent.exceptions(_read(store, 512), chunk_bytes=512, store_chunks=80,
                   base_chunks=base_chunks, where="s")
