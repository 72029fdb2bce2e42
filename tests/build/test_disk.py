"""disk.img: the plan and the GPT rewrite without tools, then real images
made with pyparted and mke2fs and read back with sfdisk, pyparted, e2fsprogs
and (as root) the kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.build import disk, ext4
from dmoverlay.build.ext4 import mkfs_env
from dmoverlay.core import debugfs
from dmoverlay.core.errors import CommandFailed, ImageError, UsageError
from dmoverlay.core.sizes import GiB, KiB, MiB

EPOCH = 1_700_000_000
SEED = "0" * 64
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tool(*argv: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                          check=check, env={"PATH": PATH, "LC_ALL": "C"})


def make_plan(squashfs_size: int = 10 * MiB, **kw: Any) -> disk.DiskLayout:
    options: dict[str, Any] = {"label": "LIVE", "live_dir": "LiveOS", "overlay_size": None,
                               "seed": SEED}
    options.update(kw)
    return disk.plan(squashfs_size=squashfs_size, **options)


# ------------------------------------------------------------------ the plan


def test_plan_puts_the_live_partition_at_1_mib() -> None:
    layout = make_plan(10 * MiB)
    (live,) = layout.partitions
    assert (live.number, live.start, live.name) == (1, MiB, "LIVE")
    assert (live.filesystem, live.fs_label) == ("ext4", "LIVE")
    assert live.size % MiB == 0 and live.size > 10 * MiB
    assert layout.size == live.end + MiB  # the backup GPT, rounded up to 1 MiB
    assert layout.overlay is None
    assert layout.kernel_args == "root=live:LABEL=LIVE rd.live.dir=LiveOS"


def test_plan_adds_the_overlay_after_the_live_partition() -> None:
    layout = make_plan(10 * MiB, overlay_size=3 * MiB + 1, label="Fedora-41")
    live, overlay = layout.partitions
    assert layout.overlay == overlay
    assert (overlay.number, overlay.start, overlay.size) == (2, live.end, 4 * MiB)
    assert (overlay.name, overlay.filesystem, overlay.fs_uuid) == ("Fedora-41-overlay", None, None)
    assert layout.size == overlay.end + MiB
    as_json = json.loads(json.dumps(layout.to_dict()))
    assert [p["name"] for p in as_json["partitions"]] == ["Fedora-41", "Fedora-41-overlay"]
    assert as_json["size"] == layout.size


def test_identifiers_derive_from_the_seed() -> None:
    a = make_plan(overlay_size=MiB)
    assert make_plan(overlay_size=MiB) == a
    b = make_plan(overlay_size=MiB, seed="1" * 64)
    ids = [a.uuid, a.live.uuid, a.live.fs_uuid, a.partitions[1].uuid]
    assert len(set(ids)) == 4
    assert not set(ids) & {b.uuid, b.live.uuid, b.live.fs_uuid, b.partitions[1].uuid}


def test_identity_seed_changes_with_every_input() -> None:
    base = {"label": "LIVE", "live_dir": "LiveOS", "overlay_size": None, "epoch": EPOCH}
    seeds = {disk.identity_seed("a", **base)}  # type: ignore[arg-type]
    for key, value in [("label", "X"), ("live_dir", "X"), ("overlay_size", MiB),
                       ("epoch", EPOCH + 1)]:
        seeds.add(disk.identity_seed("a", **{**base, key: value}))  # type: ignore[arg-type]
    seeds.add(disk.identity_seed("b", **base))  # type: ignore[arg-type]
    assert len(seeds) == 6


@pytest.mark.parametrize("label", ["", "x" * 17, "has space", "a/b", "é", "-x", "LIVE\n"])
def test_bad_label(label: str) -> None:
    with pytest.raises(UsageError) as err:
        make_plan(label=label)
    assert err.value.hint and "16" in err.value.hint


@pytest.mark.parametrize("live_dir", ["", "/LiveOS", "LiveOS/", "../x", "a//b", "a/./b",
                                      "a b", "x\\y"])
def test_bad_live_dir(live_dir: str) -> None:
    with pytest.raises(UsageError) as err:
        make_plan(live_dir=live_dir)
    assert err.value.hint and "LiveOS" in err.value.hint


@pytest.mark.parametrize("size", [-1, 0, 1, 64 * KiB, MiB - 1])
def test_overlay_smaller_than_1_mib(size: int) -> None:
    with pytest.raises(UsageError, match="too small"):
        make_plan(overlay_size=size)


def test_accepted_names() -> None:
    layout = make_plan(label="A" * 16, live_dir="boot/live.d/x_1")
    assert layout.live.name == "A" * 16
    assert disk.tree_modes("boot/live.d/x_1")[2:] == [
        ("boot", 0o040755), ("boot/live.d", 0o040755), ("boot/live.d/x_1", 0o040755),
        ("boot/live.d/x_1/squashfs.img", 0o100644)]


@given(st.integers(min_value=0, max_value=64 * GiB))
def test_live_partition_holds_content_overhead_and_margin(squashfs_size: int) -> None:
    size = disk.live_partition_size(squashfs_size, live_dir="LiveOS")
    blocks = size // disk.BLOCK
    content = disk.live_content_blocks(squashfs_size, live_dir="LiveOS")
    margin = max(256, content // 100)
    need = content + margin + disk.fs_overhead_blocks(blocks)
    assert size % MiB == 0
    # Big enough, and no more than one alignment step bigger than needed.
    assert 0 <= blocks - need < MiB // disk.BLOCK


def test_backup_groups_follow_sparse_super() -> None:
    # Groups 0, 1, 3, 5, 7, 9, 25, 27, 49 below 50.
    assert [ext4.backup_groups(n) for n in (1, 2, 3, 4, 8, 10, 26, 28, 50)] == [
        1, 2, 2, 3, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("squashfs_size", [3 * MiB, 127 * MiB, 500 * MiB, 2 * GiB,
                                           10 * GiB, 40 * GiB])
def test_overhead_model_matches_mke2fs(tmp_path: Path, squashfs_size: int) -> None:
    """The real mke2fs, with the planned options, on a sparse file: the
    model of its own blocks is never short and no more than a little over."""
    layout = make_plan(squashfs_size)
    fs = disk.live_fs(layout, epoch=EPOCH)
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, layout.size)
    subprocess.run(ext4.mkfs_argv(fs, image, offset=layout.live.start), check=True,
                   capture_output=True, env={"PATH": PATH, "LC_ALL": "C", **mkfs_env(fs)})
    header = dumpe2fs(image, layout.live.start)
    blocks, free = int(header["Block count"]), int(header["Free blocks"])
    assert blocks == layout.live.size // disk.BLOCK
    assert int(header["Inode count"]) == fs.inodes
    used = blocks - free
    assert used <= disk.fs_overhead_blocks(blocks) <= used + ext4.FRESH_FS_BLOCKS
    assert free >= disk.live_content_blocks(squashfs_size, live_dir="LiveOS")


# ------------------------------------------------------------------ squashfs header


def test_squashfs_header_checks() -> None:
    head = bytearray(96)
    head[:4] = b"hsqs"
    head[28:30] = (4).to_bytes(2, "little")
    head[40:48] = (8192).to_bytes(8, "little")
    disk.check_squashfs_header(bytes(head), size=8192, name="s")
    with pytest.raises(ImageError, match="damaged"):
        disk.check_squashfs_header(bytes(head), size=8191, name="s")
    with pytest.raises(ImageError, match="not a squashfs"):
        disk.check_squashfs_header(b"sqsh" + bytes(head[4:]), size=8192, name="s")
    with pytest.raises(ImageError, match="not a squashfs"):
        disk.check_squashfs_header(b"hsqs", size=4, name="s")
    head[28:30] = (3).to_bytes(2, "little")
    with pytest.raises(ImageError, match="version 3"):
        disk.check_squashfs_header(bytes(head), size=8192, name="s")


# ------------------------------------------------------------------ GPT, by the spec


def spec_entries(layout: disk.DiskLayout, *, extra: int = 0) -> bytes:
    """An entry array as a partitioner writes it: random unique GUIDs, names."""
    entries = bytearray(128 * 128)
    for i, p in enumerate(layout.partitions):
        e = bytearray(128)
        e[0:16] = uuid.uuid4().bytes_le
        e[16:32] = uuid.uuid4().bytes_le
        e[32:40] = p.first_lba.to_bytes(8, "little")
        e[40:48] = p.last_lba.to_bytes(8, "little")
        e[48:56] = (1 << 60).to_bytes(8, "little")
        e[56:56 + 2 * len(p.name)] = p.name.encode("utf-16-le")
        entries[i * 128:(i + 1) * 128] = e
    for i in range(extra):
        entries[(len(layout.partitions) + i) * 128] = 1
    return bytes(entries)


def spec_header(entries: bytes, *, my_lba: int, alternate_lba: int) -> bytes:
    h = bytearray(512)
    h[0:8] = b"EFI PART"
    h[8:12] = (0x00010000).to_bytes(4, "little")
    h[12:16] = (92).to_bytes(4, "little")
    h[24:32] = my_lba.to_bytes(8, "little")
    h[32:40] = alternate_lba.to_bytes(8, "little")
    h[40:48] = (34).to_bytes(8, "little")
    h[56:72] = uuid.uuid4().bytes_le
    h[72:80] = (2 if my_lba == 1 else my_lba - 32).to_bytes(8, "little")
    h[80:84] = (128).to_bytes(4, "little")
    h[84:88] = (128).to_bytes(4, "little")
    h[88:92] = zlib.crc32(entries).to_bytes(4, "little")
    h[16:20] = zlib.crc32(h[:92]).to_bytes(4, "little")
    return bytes(h)


def spec_check(header: bytes, entries: bytes) -> None:
    """The two checksums as UEFI defines them."""
    zeroed = header[:16] + bytes(4) + header[20:92]
    assert int.from_bytes(header[16:20], "little") == zlib.crc32(zeroed)
    assert int.from_bytes(header[88:92], "little") == zlib.crc32(entries)


@pytest.mark.parametrize("my_lba", [1, 32767])
def test_patch_gpt_sets_the_planned_guids(my_lba: int) -> None:
    layout = make_plan(overlay_size=MiB)
    entries = spec_entries(layout)
    header = spec_header(entries, my_lba=my_lba, alternate_lba=1 if my_lba > 1 else 32767)
    new_header, new_entries = disk.patch_gpt(header, entries, layout)
    spec_check(new_header, new_entries)
    assert uuid.UUID(bytes_le=new_header[56:72]) == uuid.UUID(layout.uuid)
    for i, p in enumerate(layout.partitions):
        e = new_entries[i * 128:(i + 1) * 128]
        assert uuid.UUID(bytes_le=e[0:16]) == disk.LINUX_DATA
        assert uuid.UUID(bytes_le=e[16:32]) == uuid.UUID(p.uuid)
        assert e[32:] == entries[i * 128 + 32:(i + 1) * 128]  # LBAs, attributes, name
    changed = {i for i in range(512) if new_header[i] != header[i]}
    assert changed <= set(range(16, 20)) | set(range(56, 72)) | set(range(88, 92))
    assert new_entries[256:] == entries[256:]
    assert disk.patch_gpt(new_header, new_entries, layout) == (new_header, new_entries)


def test_patch_gpt_refuses_damage_and_surprises() -> None:
    layout = make_plan()
    entries = spec_entries(layout)
    header = spec_header(entries, my_lba=1, alternate_lba=99)
    with pytest.raises(ImageError, match="no GPT header"):
        disk.patch_gpt(b"EFI PARX" + header[8:], entries, layout)
    with pytest.raises(ImageError, match="header checksum"):
        disk.patch_gpt(header[:60] + bytes([header[60] ^ 0xFF]) + header[61:], entries, layout)
    with pytest.raises(ImageError, match="entries do not match their checksum"):
        disk.patch_gpt(header, b"\x01" + entries[1:], layout)
    extra = spec_entries(layout, extra=1)
    with pytest.raises(ImageError, match="not planned"):
        disk.patch_gpt(spec_header(extra, my_lba=1, alternate_lba=99), extra, layout)
    moved = spec_entries(make_plan(squashfs_size=100 * MiB))
    with pytest.raises(ImageError, match="planned"):
        disk.patch_gpt(spec_header(moved, my_lba=1, alternate_lba=99), moved, layout)


# ------------------------------------------------------------------ debugfs texts


def test_populate_script() -> None:
    script = disk.populate_script("boot/live", source="src", epoch=EPOCH).decode()
    lines = script.splitlines()
    assert lines[:5] == ['mkdir "/boot"', 'mkdir "/boot/live"', 'cd "/boot/live"',
                         'write "src" "squashfs.img"', 'cd "/"']
    assert 'sif "/boot/live/squashfs.img" mode 0100644' in lines
    assert 'sif "/lost+found" mode 040700' in lines
    assert f'sif "/" crtime_lo {EPOCH}' in lines
    assert script.endswith("\n")
    # root, lost+found, boot, boot/live, the squashfs
    assert sum(line.endswith(" uid 0") for line in lines) == 5
    assert sum(line.endswith(f"_lo {EPOCH}") for line in lines) == 5 * 4


def test_debugfs_problems() -> None:
    stderr = ("debugfs 1.47.0 (5-Feb-2023)\n"
              "write: Could not allocate block in ext2 filesystem \n\n")
    assert debugfs.problems(stderr) == ["write: Could not allocate block in ext2 filesystem"]
    assert debugfs.problems("debugfs 1.47.0 (5-Feb-2023)\n") == []


# ------------------------------------------------------------------ real images


@pytest.fixture(scope="module")
def squashfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("squashfs")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("live\n")
    (tree / "usr").mkdir()
    (tree / "usr" / "blob").write_bytes(os.urandom(300 * KiB))
    image = base / "squashfs.img"
    tool("mksquashfs", tree, image, "-noappend", "-no-progress", "-quiet", "-comp", "gzip")
    return image


def build(tmp_path: Path, squashfs: Path, name: str = "disk.img", **kw: Any
          ) -> tuple[Path, disk.DiskLayout]:
    scratch = tmp_path / f"scratch-{name}"
    scratch.mkdir()
    target = tmp_path / name
    layout = disk.make_disk(squashfs, target, epoch=EPOCH, scratch=scratch, **kw)
    assert list(scratch.iterdir()) == []  # its own scratch directory is gone
    return target, layout


def dumpe2fs(image: Path, offset: int) -> dict[str, str]:
    out = tool("dumpe2fs", "-h", f"{image}?offset={offset}").stdout
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def sfdisk_table(image: Path) -> dict[str, Any]:
    result = tool("sfdisk", "--json", image)
    assert result.stderr == ""  # e.g. "The backup GPT table is corrupt"
    table: dict[str, Any] = json.loads(result.stdout)["partitiontable"]
    return table


def parted_table(image: Path) -> list[tuple[int, int, int, str]]:
    import parted

    device = parted.getDevice(os.fspath(image))
    try:
        table = parted.newDisk(device)
        return [(p.number, p.geometry.start, p.geometry.length, p.name)
                for p in table.partitions]
    finally:
        device.removeFromCache()


def both_gpts(image: Path) -> list[tuple[bytes, bytes]]:
    """Primary and backup header with their entries, found by the spec."""
    data = image.read_bytes()
    last = len(data) // 512 - 1
    return [(data[512:1024], data[1024:1024 + 128 * 128]),
            (data[last * 512:(last + 1) * 512], data[(last - 32) * 512:last * 512])]


def test_gpt_is_what_was_planned(tmp_path: Path, squashfs: Path) -> None:
    image, layout = build(tmp_path, squashfs, overlay_size=8 * MiB)
    assert image.stat().st_size == layout.size
    table = sfdisk_table(image)
    assert (table["label"], table["sectorsize"]) == ("gpt", 512)
    assert uuid.UUID(table["id"]) == uuid.UUID(layout.uuid)
    got = [(p["start"], p["size"], p["name"], uuid.UUID(p["uuid"]), uuid.UUID(p["type"]))
           for p in table["partitions"]]
    assert got == [(p.first_lba, p.size // 512, p.name, uuid.UUID(p.uuid), disk.LINUX_DATA)
                   for p in layout.partitions]
    assert parted_table(image) == [(p.number, p.first_lba, p.size // 512, p.name)
                                   for p in layout.partitions]
    verify = tool("sfdisk", "--verify", image)
    assert "No errors detected" in verify.stdout and verify.stderr == ""
    (primary, primary_entries), (backup, backup_entries) = both_gpts(image)
    spec_check(primary, primary_entries)
    spec_check(backup, backup_entries)
    assert primary_entries == backup_entries
    assert primary[56:72] == backup[56:72] == uuid.UUID(layout.uuid).bytes_le


def test_live_partition_holds_the_squashfs(tmp_path: Path, squashfs: Path) -> None:
    image, layout = build(tmp_path, squashfs)
    live = layout.live
    header = dumpe2fs(image, live.start)
    assert header["Filesystem volume name"] == "LIVE"
    assert header["Filesystem UUID"] == live.fs_uuid
    assert int(header["Block count"]) * disk.BLOCK == live.size
    check = tool("e2fsck", "-fn", f"{image}?offset={live.start}", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    spec = f"{image}?offset={live.start}"
    stat = tool("debugfs", "-R", "stat /LiveOS/squashfs.img", spec).stdout
    assert "Mode:  0644" in stat and "User:     0   Group:     0" in stat
    assert f"mtime: {EPOCH:#x}:00000000" in stat and f"ctime: {EPOCH:#x}:00000000" in stat
    copy = tmp_path / "copy.img"
    tool("debugfs", "-R", f"dump /LiveOS/squashfs.img {copy}", spec)
    assert copy.read_bytes() == squashfs.read_bytes()


def test_same_inputs_same_bytes(tmp_path: Path, squashfs: Path) -> None:
    first, layout = build(tmp_path, squashfs, "a.img", overlay_size=2 * MiB)
    # What a second build may see differently: times, xattrs, the wall clock.
    source = tmp_path / "again.img"
    shutil.copyfile(squashfs, source)
    os.utime(source, (time.time() + 1000, time.time() + 1000))
    os.setxattr(source, "user.dmoverlay-test", b"not for the image")
    os.chmod(source, 0o600)
    time.sleep(1.1)
    second, again = build(tmp_path, source, "b.img", overlay_size=2 * MiB)
    assert again == layout
    assert first.read_bytes() == second.read_bytes()
    listing = tool("debugfs", "-R", "ea_list /LiveOS/squashfs.img",
                   f"{second}?offset={layout.live.start}").stdout
    assert "dmoverlay-test" not in listing


def test_squashfs_filling_a_block_group_fits(tmp_path: Path, squashfs: Path) -> None:
    """Real allocation, not just the model: 127 MiB leaves the least room
    (the partition ends just past the first 128 MiB block group)."""
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.write(squashfs.read_bytes()[:96])  # only the header is read
        f.write(os.urandom(127 * MiB - 96))
    image, layout = build(tmp_path, big)
    spec = f"{image}?offset={layout.live.start}"
    check = tool("e2fsck", "-fn", spec, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    copy = tmp_path / "copy.img"
    tool("debugfs", "-R", f"dump /LiveOS/squashfs.img {copy}", spec)
    assert copy.read_bytes() == big.read_bytes()


def test_same_path_twice(tmp_path: Path, squashfs: Path) -> None:
    """libparted caches devices by path, with their size."""
    image, small = build(tmp_path, squashfs, "x.img")
    image.unlink()
    (tmp_path / "scratch-x.img").rmdir()
    image, big = build(tmp_path, squashfs, "x.img", overlay_size=64 * MiB)
    assert big.size > small.size
    assert len(sfdisk_table(image)["partitions"]) == 2
    assert "No errors detected" in tool("sfdisk", "--verify", image).stdout


def test_different_squashfs_different_ids(tmp_path: Path, squashfs: Path) -> None:
    other_tree = tmp_path / "tree"
    other_tree.mkdir()
    (other_tree / "x").write_text("x")
    other = tmp_path / "other.img"
    tool("mksquashfs", other_tree, other, "-noappend", "-no-progress", "-quiet")
    _, a = build(tmp_path, squashfs, "a.img")
    _, b = build(tmp_path, other, "b.img")
    assert {a.uuid, a.live.uuid, a.live.fs_uuid}.isdisjoint({b.uuid, b.live.uuid,
                                                            b.live.fs_uuid})


def test_overlay_partition(tmp_path: Path, squashfs: Path) -> None:
    image, layout = build(tmp_path, squashfs, overlay_size=5 * MiB)
    overlay = layout.overlay
    assert overlay is not None and overlay.size == 5 * MiB
    (_, part2) = sfdisk_table(image)["partitions"]
    assert (part2["name"], part2["start"] * 512, part2["size"] * 512) == (
        "LIVE-overlay", overlay.start, 5 * MiB)
    with open(image, "rb") as f:
        f.seek(overlay.start)
        assert f.read(disk.OVERLAY_ZEROED) == bytes(disk.OVERLAY_ZEROED)
        # Written, not a hole: sparse-aware copies must carry the zeros.
        assert os.lseek(f.fileno(), overlay.start, os.SEEK_DATA) == overlay.start
    blkid = tool("blkid", "-p", "-O", str(overlay.start), "-S", str(overlay.size), image,
                 check=False)
    assert blkid.returncode == 2 and blkid.stdout == ""  # no filesystem found


def test_other_label_and_live_dir(tmp_path: Path, squashfs: Path) -> None:
    image, layout = build(tmp_path, squashfs, label="Rescue_1.0", live_dir="boot/live")
    assert [p["name"] for p in sfdisk_table(image)["partitions"]] == ["Rescue_1.0"]
    spec = f"{image}?offset={layout.live.start}"
    assert dumpe2fs(image, layout.live.start)["Filesystem volume name"] == "Rescue_1.0"
    stat = tool("debugfs", "-R", "stat /boot/live/squashfs.img", spec).stdout
    assert "Type: regular" in stat
    assert layout.kernel_args == "root=live:LABEL=Rescue_1.0 rd.live.dir=boot/live"


# ------------------------------------------------------------------ failures


def test_missing_squashfs(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such squashfs"):
        build(tmp_path, tmp_path / "nothing.img")
    assert not (tmp_path / "disk.img").exists()


def test_not_a_squashfs(tmp_path: Path) -> None:
    fake = tmp_path / "fake.img"
    fake.write_bytes(os.urandom(8192))
    with pytest.raises(ImageError, match="not a squashfs"):
        build(tmp_path, fake)
    assert not (tmp_path / "disk.img").exists()


def test_refuses_to_overwrite(tmp_path: Path, squashfs: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"precious")
    with pytest.raises(ImageError, match="already exists") as err:
        build(tmp_path, squashfs)
    assert err.value.hint
    assert (tmp_path / "disk.img").read_bytes() == b"precious"


def test_no_directory_for_the_disk(tmp_path: Path, squashfs: Path) -> None:
    with pytest.raises(ImageError, match="cannot create"):
        disk.make_disk(squashfs, tmp_path / "missing" / "disk.img", epoch=EPOCH,
                       scratch=tmp_path)


def test_overlay_too_small_creates_nothing(tmp_path: Path, squashfs: Path) -> None:
    with pytest.raises(UsageError, match="too small"):
        build(tmp_path, squashfs, overlay_size=512 * KiB)
    assert not (tmp_path / "disk.img").exists()


def test_negative_epoch(tmp_path: Path, squashfs: Path) -> None:
    with pytest.raises(UsageError, match="before 1970"):
        disk.make_disk(squashfs, tmp_path / "disk.img", epoch=-1, scratch=tmp_path)
    assert not (tmp_path / "disk.img").exists()


def test_without_pyparted(tmp_path: Path, squashfs: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "parted", None)  # import parted now fails
    with pytest.raises(ImageError, match="pyparted") as err:
        build(tmp_path, squashfs)
    assert err.value.hint and "python3-parted" in err.value.hint
    assert not (tmp_path / "disk.img").exists()


def test_a_real_parted_error_becomes_an_image_error(tmp_path: Path) -> None:
    layout = make_plan(overlay_size=MiB)
    small = tmp_path / "small.img"
    small.write_bytes(b"")
    os.truncate(small, 4 * MiB)  # the plan's partitions do not fit
    with pytest.raises(ImageError, match="parted cannot write the partition table"):
        disk.write_partition_table(disk.import_parted(), small, layout)


def test_parted_failure_leaves_no_file(tmp_path: Path, squashfs: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = disk.import_parted()

    class Broken:
        """pyparted, but freshDisk fails ("parted" is a wrapper object, not a
        module, and pytest cannot undo setattr on it)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def freshDisk(self, *args: object) -> None:
            raise real.DiskException("injected failure")

    monkeypatch.setattr(disk, "import_parted", Broken)
    with pytest.raises(ImageError, match="injected failure"):
        build(tmp_path, squashfs)
    assert not (tmp_path / "disk.img").exists()


def test_squashfs_that_does_not_fit_leaves_no_file(tmp_path: Path, squashfs: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.img"
    big.write_bytes(squashfs.read_bytes() + os.urandom(8 * MiB))
    monkeypatch.setattr(disk, "live_content_blocks", lambda size, live_dir: 0)
    with pytest.raises(ImageError, match="Could not allocate block"):
        build(tmp_path, big)
    assert not (tmp_path / "disk.img").exists()


def test_mkfs_failure_leaves_no_file(tmp_path: Path, squashfs: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mkfs.ext4"
    fake.write_text("#!/bin/sh\necho 'mkfs.ext4: injected failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")
    with pytest.raises(CommandFailed, match="injected failure"):
        build(tmp_path, squashfs)
    assert not (tmp_path / "disk.img").exists()


# ------------------------------------------------------------------ privilege

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOBODY_SCRIPT = """
import json, sys
from pathlib import Path
from dmoverlay.build import disk
from dmoverlay.core import log
log.quiet = True
layout = disk.make_disk(Path("squashfs.img"), Path("disk.img"), overlay_size=1 << 20,
                        epoch=int(sys.argv[1]), scratch=Path("scratch"))
print(json.dumps(layout.to_dict()))
"""


@pytest.fixture
def world_writable_dir() -> Iterator[Path]:
    # Not under tmp_path: pytest makes that reachable by its owner only.
    path = Path(tempfile.mkdtemp(prefix="dmoverlay-nobody-"))
    try:
        path.chmod(0o777)
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.root
@needs_root
def test_no_root_needed(tmp_path: Path, squashfs: Path, world_writable_dir: Path) -> None:
    work = world_writable_dir
    shutil.copyfile(squashfs, work / "squashfs.img")
    (work / "scratch").mkdir()
    for path in (work / "squashfs.img", work / "scratch"):
        os.chown(path, 65534, 65534)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", NOBODY_SCRIPT, str(EPOCH)],
        cwd=work, capture_output=True, text=True, env={"PATH": PATH, "HOME": os.fspath(work)})
    assert result.returncode == 0, result.stderr
    assert (work / "disk.img").stat().st_uid == 65534
    as_root, layout = build(tmp_path, squashfs, overlay_size=MiB)
    assert json.loads(result.stdout) == layout.to_dict()
    # Who built it leaves no trace: the bytes are the same.
    assert (work / "disk.img").read_bytes() == as_root.read_bytes()


@contextmanager
def loop_device(image: Path, *options: str) -> Iterator[str]:
    device = tool("losetup", "--find", "--show", "--read-only", *options, image).stdout.strip()
    try:
        yield device
    finally:
        tool("losetup", "--detach", device)


@contextmanager
def mounted(device: str | Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    tool("mount", "-t", "ext4", "-o", "ro", device, mountpoint)
    try:
        yield mountpoint
    finally:
        tool("umount", mountpoint)


def check_live_filesystem(device: str | Path, mountpoint: Path, squashfs: Path) -> None:
    with mounted(device, mountpoint):
        inside = mountpoint / "LiveOS" / "squashfs.img"
        assert inside.read_bytes() == squashfs.read_bytes()
        assert (inside.stat().st_mode, inside.stat().st_uid) == (0o100644, 0)
    assert tool("blkid", "-o", "value", "-s", "LABEL", device).stdout.strip() == "LIVE"


@pytest.mark.root
@needs_root
def test_kernel_reads_the_partitions(tmp_path: Path, squashfs: Path) -> None:
    """Each partition attached at its offset: no GPT support in the kernel needed."""
    image, layout = build(tmp_path, squashfs, overlay_size=3 * MiB)
    live, overlay = layout.partitions
    with loop_device(image, "--offset", str(live.start), "--sizelimit", str(live.size)) as dev:
        check_live_filesystem(dev, tmp_path / "mnt", squashfs)
    with loop_device(image, "--offset", str(overlay.start),
                     "--sizelimit", str(overlay.size)) as dev:
        assert int(tool("blockdev", "--getsize64", dev).stdout) == 3 * MiB
        with open(dev, "rb") as f:
            assert f.read(disk.OVERLAY_ZEROED) == bytes(disk.OVERLAY_ZEROED)


@pytest.mark.root
@needs_root
def test_kernel_finds_the_gpt_partitions(tmp_path: Path, squashfs: Path) -> None:
    image, layout = build(tmp_path, squashfs, overlay_size=3 * MiB)
    with loop_device(image, "--partscan") as dev:
        name = Path(dev).name
        # The kernel scans while losetup attaches; the /dev nodes follow.
        if not Path(f"/sys/class/block/{name}/{name}p1").exists():
            pytest.skip("this kernel reads no GPT (CONFIG_EFI_PARTITION is off)")
        first, second = Path(f"{dev}p1"), Path(f"{dev}p2")
        for _ in range(50):
            if first.exists() and second.exists():
                break
            time.sleep(0.1)
        assert int(tool("blockdev", "--getsize64", first).stdout) == layout.live.size
        assert int(tool("blockdev", "--getsize64", second).stdout) == 3 * MiB
        partlabel = tool("blkid", "-p", "-o", "value", "-s", "PART_ENTRY_NAME", second)
        assert partlabel.stdout.strip() == "LIVE-overlay"
        check_live_filesystem(first, tmp_path / "mnt", squashfs)


def test_one_mkfs_command_line_for_rootfs_and_disk() -> None:
    """The live partition's mkfs line is rootfs.img's, but for its offset
    and the tree it is not filled from."""
    layout = make_plan(100 * MiB)
    fs = disk.live_fs(layout, epoch=EPOCH)
    at = ext4.mkfs_argv(fs, Path("d.img"), offset=layout.live.start)
    filled = ext4.mkfs_argv(fs, Path("d.img"), Path("tree"))
    assert "-d" not in at and filled[-4:-2] == ["-d", "tree"]
    extended = at[at.index("-E") + 1].split(",")
    assert extended[0] == f"offset={layout.live.start}"
    assert extended[1:] == filled[filled.index("-E") + 1].split(",")
    assert [a for a in at if a != at[at.index("-E") + 1]] == [
        a for a in filled if a not in ("-d", "tree", filled[filled.index("-E") + 1])]
