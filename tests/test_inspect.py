"""`dmoverlay inspect` on real images made here with mkfs.ext4, mksquashfs
and pyparted, and the pure parsers of tool output it relies on."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import parted
import pytest
from click.testing import CliRunner
from click.testing import Result as ClickResult

from dmoverlay.cli import Group
from dmoverlay.cli.inspect import command
from dmoverlay.core import debugfs
from dmoverlay.core.errors import CommandFailed, ImageError
from dmoverlay.core.run import run, run_head
from dmoverlay.core.superblock import parse_ext4
from dmoverlay.inspect import (
    BlockRun,
    Ext4Report,
    ImageReport,
    SquashfsReport,
    Stat,
    contiguous_start,
    format_report,
    inspect_image,
    parse_listing,
    parse_stat,
)
from dmoverlay.overlay import baseid
from dmoverlay.overlay.persistent import STORE_MAGIC

EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z
EPOCH_ISO = "2023-11-14T22:13:20Z"
ROOT_LABEL = "dmo-root"
ROOT_UUID = "0d9f8a3e-6b1c-4c2d-9e8f-112233445566"
MiB = 1 << 20
NOBODY = 65534

# ---------------------------------------------------------------- image making


def make_tree(root: Path) -> int:
    """A small root tree; returns how many inodes it takes (hard links once)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("NAME=Test\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n" * 50)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    (root / "usr/lib").mkdir()
    (root / "usr/lib/libx.so").write_bytes(os.urandom(3000))
    (root / "var/empty").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    inodes = {os.lstat(p).st_ino for p in root.rglob("*")}
    assert len(inodes) == 10  # 6 directories, 3 files, 1 symlink
    return len(inodes)


def mkfs(image: Path, tree: Path, *, blocks: int, block_size: int = 4096, offset: int = 0,
         label: str = ROOT_LABEL, fs_uuid: str = ROOT_UUID, fs_type: str = "ext4") -> None:
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(offset + blocks * block_size)
    argv = ["mke2fs", "-q", "-F", "-t", fs_type, "-b", str(block_size), "-L", label,
            "-U", fs_uuid, "-d", str(tree)]
    if offset:
        argv += ["-E", f"offset={offset}"]
    run([*argv, str(image), str(blocks)], env={"E2FSPROGS_FAKE_TIME": str(EPOCH)})


def mksquashfs(src: Path, out: Path, *comp: str) -> None:
    run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress",
         "-mkfs-time", str(EPOCH), *(comp or ("-comp", "xz"))])


def liveos_squashfs(tmp: Path, *comp: str, name: str = "rootfs.img", fs_type: str = "ext4",
                    padding: int = 0) -> Path:
    """squashfs.img holding LiveOS/<name>: a 32 MiB sparse ext filesystem."""
    tree = tmp / "tree"
    if not tree.exists():
        make_tree(tree)
    (tmp / "sq/LiveOS").mkdir(parents=True)
    mkfs(tmp / "sq/LiveOS" / name, tree, blocks=8192, fs_type=fs_type)
    if padding:  # data that does not compress, to make the image big
        (tmp / "sq/LiveOS/padding.bin").write_bytes(os.urandom(padding))
    out = tmp / "squashfs.img"
    mksquashfs(tmp / "sq", out, *comp)
    shutil.rmtree(tmp / "sq")
    return out


def partitioned(image: Path, *, table: str, size: int,
                parts: list[tuple[int, int, str | None]], logical: int = 0) -> list[int]:
    """A disk image with partitions (start MiB, size MiB, GPT name); returns
    the byte offset of each.  With `logical`, the last `logical` of them
    are logical partitions in an extended one that spans them (MBR)."""
    with open(image, "wb") as f:
        f.truncate(size)
    device = parted.getDevice(str(image))
    disk = parted.freshDisk(device, table)

    def add(kind: int, start: int, length: int) -> Any:
        geometry = parted.Geometry(device=device, start=start * 2048, length=length * 2048)
        part = parted.Partition(disk=disk, type=kind, geometry=geometry)
        disk.addPartition(part, constraint=parted.Constraint(exactGeom=geometry))
        return part

    for i, (start, length, name) in enumerate(parts):
        kind = parted.PARTITION_NORMAL
        if i >= len(parts) - logical:
            kind = parted.PARTITION_LOGICAL
            if i == len(parts) - logical:  # the extended one first
                last = parts[-1]
                add(parted.PARTITION_EXTENDED, start - 1, last[0] + last[1] - start + 1)
        part = add(kind, start, length)
        if name:
            part.name = name
    disk.commit()
    return [start * MiB for start, _, _ in parts]


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every good image the tests read, made once."""
    made: dict[str, Path] = {}

    top = tmp_path_factory.mktemp("xz")
    made["xz"] = liveos_squashfs(top)
    made["zstd"] = liveos_squashfs(tmp_path_factory.mktemp("zstd"), "-comp", "zstd",
                                   "-b", "64K")
    made["ext3"] = liveos_squashfs(tmp_path_factory.mktemp("ext3"), "-comp", "gzip",
                                   name="ext3fs.img", fs_type="ext3")

    plain = tmp_path_factory.mktemp("plain")
    make_tree(plain / "tree")
    made["plain"] = plain / "plain.img"
    mksquashfs(plain / "tree", made["plain"], "-comp", "lzo")

    made["rootfs"] = top / "rootfs.img"
    mkfs(made["rootfs"], top / "tree", blocks=4096)

    # An ext4 image holding LiveOS/squashfs.img, like a partition of live media.
    media = tmp_path_factory.mktemp("media")
    (media / "fs/LiveOS").mkdir(parents=True)
    shutil.copy(made["xz"], media / "fs/LiveOS/squashfs.img")
    made["media"] = media / "media.img"
    mkfs(made["media"], media / "fs", blocks=4096, label="LIVE")

    made["gpt"] = media / "gpt.img"
    offsets = partitioned(made["gpt"], table="gpt", size=64 * MiB,
                          parts=[(1, 40, "LIVE"), (41, 8, None)])
    mkfs(made["gpt"], media / "fs", blocks=40 * 256, offset=offsets[0], label="LIVE",
         fs_uuid="6c1b5f0e-0000-4000-8000-000000000001")

    # MBR: partition 1 is ext4 with 1 KiB blocks holding a 17 MiB squashfs,
    # which cannot lie in one run of blocks (backup superblocks cut every
    # run of 16 MiB); partition 2 is a squashfs written straight into it;
    # partition 3 is extended, holding logical partition 5, an ext2.
    big = tmp_path_factory.mktemp("big")
    (big / "fs/LiveOS").mkdir(parents=True)
    liveos_squashfs(big / "sq", "-comp", "lz4", padding=17 * MiB).rename(
        big / "fs/LiveOS/squashfs.img")
    made["mbr"] = big / "mbr.img"
    offsets = partitioned(made["mbr"], table="msdos", size=72 * MiB,
                          parts=[(1, 40, None), (41, 8, None), (51, 8, None)], logical=1)
    mkfs(made["mbr"], top / "tree", blocks=8 * 256, offset=offsets[2], fs_type="ext2")
    mkfs(made["mbr"], big / "fs", blocks=40 * 1024, block_size=1024, offset=offsets[0],
         label="FRAG")
    with open(made["mbr"], "r+b") as disk, open(made["xz"], "rb") as sq:
        disk.seek(offsets[1])
        disk.write(sq.read())
    return made


def invoke(*args: str) -> ClickResult:
    """The command inside the project's group, which turns errors into
    `error:` and `hint:` lines."""
    group = Group(name="dmoverlay", commands={"inspect": command})
    # the click the tests are pinned to (8.2 on) keeps stdout and stderr apart
    return CliRunner().invoke(group, ["inspect", *args])


def report_json(image: Path) -> dict[str, Any]:
    result = invoke("--json", str(image))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def assert_one_error(result: ClickResult, pattern: str) -> None:
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[1].startswith("hint: ")


# ------------------------------------------------------------- good images


def expect_rootfs(fs: Any, *, fs_type: str = "ext4", size: int = 32 * MiB) -> None:
    assert isinstance(fs, dict)
    assert fs["kind"] == "ext"
    assert fs["type"] == fs_type
    assert fs["label"] == ROOT_LABEL
    assert fs["uuid"] == ROOT_UUID
    assert fs["block_size"] == 4096
    assert fs["size"] == fs["fs_size"] == size
    assert fs["files"] == 11  # the 10 of make_tree, and lost+found
    assert fs["reserved_inodes"] == 10
    assert fs["mkfs_time"] == EPOCH_ISO
    assert fs["last_mount_time"] is None
    assert fs["state"] == "clean"


def test_liveos_squashfs(images: dict[str, Path]) -> None:
    r = report_json(images["xz"])
    assert r["path"] == str(images["xz"])
    assert r["kind"] == "squashfs"
    assert r["version"] == "4.0"
    assert r["compression"] == "xz"
    assert r["block_size"] == 128 * 1024
    assert r["inodes"] == 3  # /, LiveOS, rootfs.img
    assert r["mkfs_time"] == EPOCH_ISO
    assert r["size"] == images["xz"].stat().st_size
    assert isinstance(r["bytes_used"], int) and r["bytes_used"] <= r["size"]
    assert r["layout"] == "liveos"
    rootfs = r["rootfs"]
    assert isinstance(rootfs, dict)
    assert rootfs["path"] == "LiveOS/rootfs.img"
    expect_rootfs(rootfs)
    assert "liveos_squashfs" not in rootfs  # only its superblock was read


def test_zstd_and_block_size(images: dict[str, Path]) -> None:
    r = report_json(images["zstd"])
    assert (r["compression"], r["block_size"]) == ("zstd", 64 * 1024)
    expect_rootfs(r["rootfs"])


def test_dracut_older_name_and_ext3(images: dict[str, Path]) -> None:
    r = report_json(images["ext3"])
    assert r["compression"] == "gzip"
    rootfs = r["rootfs"]
    assert isinstance(rootfs, dict)
    assert rootfs["path"] == "LiveOS/ext3fs.img"
    expect_rootfs(rootfs, fs_type="ext3")


def test_plain_squashfs_is_valid(images: dict[str, Path]) -> None:
    r = report_json(images["plain"])
    assert r["compression"] == "lzo"
    assert r["layout"] == "squashfs"
    assert r["rootfs"] is None
    assert r["inodes"] == 11  # the tree's 10 and its root


def test_ext4_agrees_with_dumpe2fs(images: dict[str, Path]) -> None:
    r = report_json(images["rootfs"])
    expect_rootfs(r, size=16 * MiB)
    assert r["liveos_squashfs"] is None
    dump = run(["dumpe2fs", "-h", str(images["rootfs"])]).stdout
    fields = dict(line.split(":", 1) for line in dump.splitlines() if ":" in line)
    assert r["features"] == fields["Filesystem features"].split()
    assert r["free_blocks"] == int(fields["Free blocks"])
    assert r["free_inodes"] == int(fields["Free inodes"])
    assert r["inodes"] == int(fields["Inode count"])
    assert r["blocks"] == int(fields["Block count"])
    assert r["free"] == int(fields["Free blocks"]) * 4096


def test_ext4_holding_liveos_squashfs(images: dict[str, Path]) -> None:
    r = report_json(images["media"])
    assert r["label"] == "LIVE"
    assert r["files"] == 3  # LiveOS, squashfs.img, lost+found
    inner = r["liveos_squashfs"]
    assert isinstance(inner, dict)
    assert inner["path"] == "LiveOS/squashfs.img"
    assert inner["size"] == images["xz"].stat().st_size
    assert inner["compression"] == "xz"
    expect_rootfs(inner["rootfs"])


def test_name_with_a_question_mark(images: dict[str, Path], tmp_path: Path) -> None:
    """debugfs reads `?` in a device name as the start of its options."""
    odd = tmp_path / "what?offset=7.img"
    shutil.copy(images["media"], odd)
    r = report_json(odd)
    assert r["path"] == str(odd)
    assert r["liveos_squashfs"]["compression"] == "xz"


def test_gpt_disk(images: dict[str, Path]) -> None:
    r = report_json(images["gpt"])
    assert (r["kind"], r["table"], r["size"]) == ("disk", "gpt", 64 * MiB)
    first, second = r["partitions"]
    assert (first["number"], first["start"], first["size"]) == (1, MiB, 40 * MiB)
    assert (first["name"], first["filesystem"], first["role"]) == ("LIVE", "ext4", None)
    fs = first["content"]
    assert (fs["label"], fs["uuid"]) == ("LIVE", "6c1b5f0e-0000-4000-8000-000000000001")
    assert fs["liveos_squashfs"]["compression"] == "xz"
    expect_rootfs(fs["liveos_squashfs"]["rootfs"])
    assert (second["number"], second["start"], second["size"]) == (2, 41 * MiB, 8 * MiB)
    assert (second["filesystem"], second["content"]) == (None, None)


def test_mbr_disk_with_a_fragmented_squashfs(images: dict[str, Path]) -> None:
    offset = MiB
    sb = images["mbr"].read_bytes()[offset + 1024:offset + 2048]
    fs = parse_ext4(sb)
    device = f"{images['mbr']}?offset={offset}"
    stat = parse_stat(run(["debugfs", "-R", "stat /LiveOS/squashfs.img", device]).stdout)
    assert stat is not None
    # The case this test is for: the file cannot be read in place.
    assert contiguous_start(stat, block_size=fs.block_size, fs_blocks=fs.blocks) is None

    r = report_json(images["mbr"])
    assert r["table"] == "msdos"
    first, second, extended, logical = r["partitions"]
    assert (first["name"], first["role"], first["filesystem"]) == (None, "primary", "ext4")
    inner = first["content"]["liveos_squashfs"]
    assert inner["size"] == stat.size > 17 * MiB
    assert inner["compression"] == "lz4"
    expect_rootfs(inner["rootfs"])
    assert (second["start"], second["filesystem"]) == (41 * MiB, "squashfs")
    assert second["content"]["compression"] == "xz"
    expect_rootfs(second["content"]["rootfs"])
    assert (extended["number"], extended["role"], extended["content"]) == (3, "extended", None)
    assert (extended["start"], extended["size"]) == (50 * MiB, 9 * MiB)
    assert (logical["number"], logical["role"], logical["start"]) == (5, "logical", 51 * MiB)
    assert logical["filesystem"] == "ext2"
    expect_rootfs(logical["content"], fs_type="ext2", size=8 * MiB)
    assert logical["content"]["liveos_squashfs"] is None


def test_in_place_read_is_what_the_gpt_test_exercises(images: dict[str, Path]) -> None:
    sb = images["gpt"].read_bytes()[MiB + 1024:MiB + 2048]
    fs = parse_ext4(sb)
    device = f"{images['gpt']}?offset={MiB}"
    stat = parse_stat(run(["debugfs", "-R", "stat /LiveOS/squashfs.img", device]).stdout)
    assert stat is not None
    assert contiguous_start(stat, block_size=fs.block_size, fs_blocks=fs.blocks) is not None


def test_json_is_the_library_report(images: dict[str, Path]) -> None:
    report = inspect_image(images["gpt"])
    assert report_json(images["gpt"]) == json.loads(json.dumps(report.to_dict()))


def test_text_is_an_indented_tree(images: dict[str, Path]) -> None:
    result = invoke(str(images["xz"]))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{images['xz']}: squashfs 4.0, xz, LiveOS layout"
    assert "  compression: xz" in lines
    assert "  block size: 128.0 KiB" in lines
    assert "  LiveOS/rootfs.img: 32.0 MiB" in lines
    assert f"    label: {ROOT_LABEL}" in lines
    assert f"    uuid: {ROOT_UUID}" in lines
    assert "    size: 32.0 MiB (8192 blocks)" in lines
    assert any(line.startswith("    files: 11 (") for line in lines)


def test_text_of_a_disk(images: dict[str, Path]) -> None:
    lines = format_report(inspect_image(images["gpt"]))
    assert lines[0] == f"{images['gpt']}: gpt disk image, 2 partitions"
    assert lines[3].startswith("  partition 1: 'LIVE', starts at 1.0 MiB (1048576 bytes), "
                               "size 40.0 MiB, ext4")
    assert "      LiveOS/rootfs.img: 32.0 MiB" in lines
    assert lines[-1] == ("  partition 2: starts at 41.0 MiB (42991616 bytes), size 8.0 MiB, "
                         "no filesystem found")


def test_no_temporary_files_are_left(images: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    inspect_image(images["mbr"])  # copies the fragmented squashfs out
    data = images["xz"].read_bytes()
    inode_table = int.from_bytes(data[64:72], "little")
    bad = patched(images["xz"], tmp_path / "bad.img", inode_table, b"\xff" * 64)
    with pytest.raises(ImageError, match="unsquashfs cannot read it"):
        inspect_image(bad)
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------- as a user


@pytest.fixture
def user_copies(images: dict[str, Path], shared_dir: Path) -> Path:
    shutil.copy(images["gpt"], shared_dir / "gpt.img")
    os.chmod(shared_dir / "gpt.img", 0o644)
    shutil.copy(images["xz"], shared_dir / "secret.img")
    os.chmod(shared_dir / "secret.img", 0o600)
    return shared_dir


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    script = ("import sys; from dmoverlay.cli import Group; "
              "from dmoverlay.cli.inspect import command; "
              "Group(name='dmoverlay', commands={'inspect': command})"
              ".main(['inspect', *sys.argv[1:]])")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", sys.executable, "-c", script, *args],
                          capture_output=True, text=True, check=False)


@pytest.mark.root
def test_works_as_a_normal_user(images: dict[str, Path], user_copies: Path) -> None:
    result = as_nobody("--json", str(user_copies / "gpt.img"))
    assert result.returncode == 0, result.stderr
    mine = json.loads(result.stdout)
    theirs = report_json(user_copies / "gpt.img")
    assert mine == theirs


@pytest.mark.root
def test_unreadable_file(user_copies: Path) -> None:
    result = as_nobody(str(user_copies / "secret.img"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: cannot read {user_copies / 'secret.img'}: Permission denied",
        "hint: inspect only reads the image: check its permissions",
    ]


# -------------------------------------------------------- persistent overlays


def store_of(base: Path, at: Path, *, size: int = 2 * MiB, record: bool = True,
             chunk_sectors: int = 8, offset: int = 0) -> baseid.BaseIdentity:
    """A store over `base` written at `offset` of `at`, as setup writes a new
    one (header and record), or as the kernel does (header alone)."""
    with open(base, "rb") as f:
        head = f.read(baseid.HEAD_BYTES)
    identity = baseid.identify(head, base.stat().st_size // 512, where=str(base))
    if record:
        first = baseid.new_store(identity, chunk_sectors)
    else:
        first = struct.pack("<4sIII", STORE_MAGIC, 1, 1, chunk_sectors)
    mode = "r+b" if at.exists() else "wb"
    with open(at, mode) as f:
        if mode == "wb":
            f.truncate(size)
        f.seek(offset)
        f.write(first)
    return identity


def test_persistent_overlay_names_the_base_it_was_made_over(
        images: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "live.overlay"
    identity = store_of(images["rootfs"], store)
    r = report_json(store)
    assert (r["kind"], r["size"], r["chunk_size"], r["recordable"]) == \
        ("snapshot-store", 2 * MiB, 4096, True)
    assert r["base"] == {"uuid": ROOT_UUID, "label": ROOT_LABEL, "size": 16 * MiB,
                         "digest": identity.digest.hex()}
    result = invoke(str(store))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{store}: persistent overlay (dm-snapshot store)",
        "  size: 2.0 MiB",
        "  chunk size: 4.0 KiB",
        f"  made over: ext4 UUID {ROOT_UUID} (label '{ROOT_LABEL}', 16.0 MiB)",
        f"  base digest: {identity.digest.hex()}",
    ]


def test_persistent_overlay_dracut_made_records_nothing(
        images: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "dracut.overlay"
    store_of(images["rootfs"], store, record=False)
    r = report_json(store)
    assert (r["kind"], r["base"], r["recordable"]) == ("snapshot-store", None, True)
    assert "  made over: not recorded (made by dracut, or not used by dmoverlay yet)" in \
        invoke(str(store)).stdout.splitlines()


def test_persistent_overlay_of_one_sector_chunks_is_not_read_for_a_record(
        images: dict[str, Path], tmp_path: Path) -> None:
    """Its second sector is the first exception area, not a record: an
    exception there is no damaged record."""
    store = tmp_path / "small-chunks.overlay"
    store_of(images["rootfs"], store, record=False, chunk_sectors=1)
    with open(store, "r+b") as f:
        f.seek(512)
        f.write(struct.pack("<QQ", 5, 2))  # chunk 5 of the base is kept in chunk 2
    r = report_json(store)
    assert (r["chunk_size"], r["base"], r["recordable"]) == (512, None, False)
    assert "  made over: not recordable (chunks of one sector)" in \
        invoke(str(store)).stdout.splitlines()


def test_persistent_overlay_on_a_partition(images: dict[str, Path], tmp_path: Path) -> None:
    disk = tmp_path / "gpt.img"
    shutil.copy(images["gpt"], disk)
    identity = store_of(images["rootfs"], disk, offset=41 * MiB)
    second = report_json(disk)["partitions"][1]
    assert second["filesystem"] == "snapshot store"
    assert second["content"]["base"]["digest"] == identity.digest.hex()
    assert second["content"]["size"] == 8 * MiB
    assert f"    made over: ext4 UUID {ROOT_UUID} (label '{ROOT_LABEL}', 16.0 MiB)" in \
        invoke(str(disk)).stdout.splitlines()


def test_persistent_overlay_the_kernel_gave_up_on(images: dict[str, Path],
                                                   tmp_path: Path) -> None:
    store = tmp_path / "invalid.overlay"
    store_of(images["rootfs"], store)
    with open(store, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 0))  # what the kernel writes when the store overflows
    assert_one_error(invoke(str(store)),
                     r"invalid.overlay: the snapshot store: the kernel marked this overlay "
                     r"store invalid")


def test_persistent_overlay_with_a_damaged_record(images: dict[str, Path],
                                                  tmp_path: Path) -> None:
    store = tmp_path / "damaged.overlay"
    store_of(images["rootfs"], store)
    with open(store, "r+b") as f:
        f.seek(baseid.RECORD_OFFSET + 40)  # inside the recorded digest
        f.write(b"\xff")
    assert_one_error(invoke(str(store)), r"damaged.overlay: the snapshot store: the record "
                                         r"of the base this overlay belongs to is damaged")


# --------------------------------------------------------------- bad input


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n" * 1000)
    assert_one_error(invoke(str(tmp_path / "notes.txt")),
                     r"notes.txt is not a squashfs, ext4 or disk image$")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.img").touch()
    assert_one_error(invoke(str(tmp_path / "empty.img")), r"empty.img is empty$")


def test_missing_file(tmp_path: Path) -> None:
    assert_one_error(invoke(str(tmp_path / "nope.img")), r"nope.img: no such file$")


def test_directory(tmp_path: Path) -> None:
    assert_one_error(invoke(str(tmp_path)), r"is a directory, not an image$")


def cut(image: Path, to: Path, fraction: float = 0.5) -> Path:
    data = image.read_bytes()
    to.write_bytes(data[:int(len(data) * fraction)])
    return to


def test_truncated_squashfs(images: dict[str, Path], tmp_path: Path) -> None:
    half = cut(images["xz"], tmp_path / "half.img")
    assert_one_error(invoke(str(half)), r"half.img: squashfs is truncated: its superblock "
                                        r"says \d+ bytes .* but only \d+ are there$")


def test_truncated_ext4(images: dict[str, Path], tmp_path: Path) -> None:
    half = cut(images["rootfs"], tmp_path / "half.img")
    assert_one_error(invoke(str(half)), r"half.img: ext filesystem is truncated: its "
                                        r"superblock says 16777216 bytes")


def test_truncated_disk(images: dict[str, Path], tmp_path: Path) -> None:
    half = cut(images["gpt"], tmp_path / "half.img")
    assert_one_error(invoke(str(half)), r"half.img: cannot read its partition table")


def patched(image: Path, to: Path, offset: int, data: bytes) -> Path:
    shutil.copy(image, to)
    with open(to, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return to


@pytest.mark.parametrize(("offset", "data", "message"), [
    pytest.param(12, (12345).to_bytes(4, "little"),
                 "squashfs superblock is corrupt: block size 12345 is not a power of two",
                 id="block size"),
    pytest.param(20, (9).to_bytes(2, "little"),
                 "squashfs superblock is corrupt: unknown compression id 9", id="compression"),
    pytest.param(28, (2).to_bytes(2, "little"), "squashfs version 2.0 is not supported",
                 id="version"),
    pytest.param(40, (1 << 40).to_bytes(8, "little"),
                 r"squashfs is truncated: its superblock says 1099511627776 bytes \(1.0 TiB\)",
                 id="bytes used"),
    pytest.param(64, (1 << 30).to_bytes(8, "little"),
                 "squashfs superblock is corrupt: its inode and directory tables are out of "
                 "place", id="inode table"),
])
def test_corrupt_squashfs_superblock(images: dict[str, Path], tmp_path: Path, offset: int,
                                     data: bytes, message: str) -> None:
    bad = patched(images["xz"], tmp_path / "bad.img", offset, data)
    assert_one_error(invoke(str(bad)), r"bad.img: " + message)


def test_corrupt_squashfs_tables(images: dict[str, Path], tmp_path: Path) -> None:
    """A sane superblock over damaged tables: unsquashfs finds out."""
    data = images["xz"].read_bytes()
    inode_table = int.from_bytes(data[64:72], "little")
    bad = patched(images["xz"], tmp_path / "bad.img", inode_table, b"\xff" * 64)
    assert_one_error(invoke(str(bad)), r"bad.img: unsquashfs cannot read it")


def test_corrupt_ext4_superblock(images: dict[str, Path], tmp_path: Path) -> None:
    bad = patched(images["rootfs"], tmp_path / "bad.img", 1024 + 0x78, b"X")
    assert_one_error(invoke(str(bad)),
                     r"bad.img: ext superblock is corrupt: its checksum does not match$")


def test_rootfs_that_is_not_ext4(tmp_path: Path) -> None:
    (tmp_path / "sq/LiveOS").mkdir(parents=True)
    (tmp_path / "sq/LiveOS/rootfs.img").write_bytes(os.urandom(64 * 1024))
    mksquashfs(tmp_path / "sq", tmp_path / "squashfs.img")
    assert_one_error(invoke(str(tmp_path / "squashfs.img")),
                     r"squashfs.img: LiveOS/rootfs.img is not an ext2/3/4 filesystem$")


def test_rootfs_that_is_truncated(images: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "sq/LiveOS").mkdir(parents=True)
    cut(images["rootfs"], tmp_path / "sq/LiveOS/rootfs.img", 0.25)
    mksquashfs(tmp_path / "sq", tmp_path / "squashfs.img")
    assert_one_error(invoke(str(tmp_path / "squashfs.img")),
                     r"squashfs.img: LiveOS/rootfs.img: ext filesystem is truncated")


def test_rootfs_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "sq/LiveOS/rootfs.img").mkdir(parents=True)
    mksquashfs(tmp_path / "sq", tmp_path / "squashfs.img")
    assert_one_error(invoke(str(tmp_path / "squashfs.img")),
                     r"squashfs.img: LiveOS/rootfs.img is not a regular file$")


def test_partition_whose_squashfs_img_is_not_a_squashfs(tmp_path: Path) -> None:
    (tmp_path / "fs/LiveOS").mkdir(parents=True)
    (tmp_path / "fs/LiveOS/squashfs.img").write_bytes(os.urandom(8192))
    offsets = partitioned(tmp_path / "disk.img", table="gpt", size=16 * MiB,
                          parts=[(1, 8, "LIVE")])
    mkfs(tmp_path / "disk.img", tmp_path / "fs", blocks=2048, offset=offsets[0])
    assert_one_error(invoke(str(tmp_path / "disk.img")),
                     r"disk.img partition 1: LiveOS/squashfs.img: not a squashfs")


# --------------------------------------------------- parsers of tool output

LISTING = "\n".join([
    "drwxr-xr-x 0/0                      29 2026-11-25 20:59 ",  # the root: an empty name
    "drwxr-xr-x 0/0                      33 2026-11-25 20:59 /LiveOS",
    "-rw-r--r-- 0/0                67108864 2026-11-25 20:59 /LiveOS/rootfs.img",
    "-rw-r--r-- 0/0                       5 2026-11-25 20:59 /LiveOS/with  two spaces",
    "lrwxrwxrwx 0/0                       9 2026-11-25 20:59 /LiveOS/ext3fs.img -> rootfs.img",
    "crw-r--r-- 0/0                  1,   3 2026-11-25 20:59 /dev/null",
    "Parallel unsquashfs: Using 2 processors",
])


def test_parse_listing() -> None:
    entries = parse_listing(LISTING)
    assert entries["LiveOS/rootfs.img"].type == "-"
    assert entries["LiveOS/rootfs.img"].size == 67108864
    assert entries["LiveOS/with  two spaces"].size == 5
    assert entries["LiveOS/ext3fs.img"].type == "l"
    assert entries["LiveOS"].type == "d"
    assert "dev/null" not in entries
    assert set(entries) == {"", "LiveOS", "LiveOS/rootfs.img", "LiveOS/with  two spaces",
                            "LiveOS/ext3fs.img"}


STAT = """\
Inode: 13   Type: regular    Mode:  0644   Flags: 0x80000
Generation: 0    Version: 0x00000000:00000000
User:     0   Group:     0   Project:     0   Size: {size}
File ACL: 0
Links: 1   Blockcount: 588
Fragment:  Address: 0    Number: 0    Size: 0
Size of extra inode fields: 32
{blocks}
"""


def test_parse_stat_extents() -> None:
    text = STAT.format(size=4096 * 300, blocks="EXTENTS:\n(ETB0):3761, (0-259):3494-3753, "
                                               "(260):3754, (261-299):3755-3793")
    s = parse_stat(text)
    assert s == Stat(type="regular", size=4096 * 300, unwritten=False, runs=(
        BlockRun(logical=0, physical=3494, length=260),
        BlockRun(logical=260, physical=3754, length=1),
        BlockRun(logical=261, physical=3755, length=39)))
    assert contiguous_start(s, block_size=4096, fs_blocks=10000) == 3494
    # the same blocks in a filesystem too small for them: damaged, not in place
    assert contiguous_start(s, block_size=4096, fs_blocks=3000) is None
    # a size the blocks do not cover
    bigger = Stat(type=s.type, size=4096 * 301, runs=s.runs, unwritten=False)
    assert contiguous_start(bigger, block_size=4096, fs_blocks=10000) is None


def test_parse_stat_block_map_with_indirect_blocks() -> None:
    """ext2 and ext3 list blocks, with the indirect block between two runs."""
    text = STAT.format(size=1024 * 20, blocks="BLOCKS:\n(0-11):1000-1011, (IND):1012, "
                                              "(12-19):1013-1020\nTOTAL: 21\n")
    s = parse_stat(text)
    assert s is not None
    assert [r.length for r in s.runs] == [12, 8]
    assert contiguous_start(s, block_size=1024, fs_blocks=5000) is None


@pytest.mark.parametrize("blocks", [
    pytest.param("EXTENTS:\n(0-9):100-109, (11-19):111-119", id="a hole"),
    pytest.param("EXTENTS:\n(0-9):100-109, (10-19):200-209", id="two places"),
    pytest.param("EXTENTS:\n(1-19):101-119", id="no first block"),
    # what debugfs prints for fallocated blocks
    pytest.param("EXTENTS:\n(0-9):100-109, (10-19[u]):110-119", id="unwritten"),
    pytest.param("Size of inline data: 60", id="inline data"),
])
def test_not_in_place(blocks: str) -> None:
    s = parse_stat(STAT.format(size=1024 * 20, blocks=blocks))
    assert s is not None
    assert contiguous_start(s, block_size=1024, fs_blocks=5000) is None


def test_parse_stat_without_an_inode() -> None:
    assert parse_stat("") is None
    assert parse_stat("/LiveOS/squashfs.img: File not found by ext2_lookup\n") is None


def test_debugfs_argument_round_trips_through_debugfs(images: dict[str, Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / 'a "quoted" name'
    request = debugfs.command(b"dump", debugfs.argument("/LiveOS/squashfs.img"),
                              debugfs.argument(str(out)))
    run(["debugfs", "-R", os.fsdecode(request), str(images["media"])])
    assert out.read_bytes() == images["xz"].read_bytes()


# ---------------------------------------------------------------- run_head


def test_stdout_head_stops_an_endless_writer() -> None:
    assert run_head(["yes", "ab"], 7) == b"ab\nab\na"


def test_stdout_head_keeps_bytes_as_they_are() -> None:
    data = run_head(["printf", r"a\r\nb\000c"], 100)
    assert data == b"a\r\nb\x00c"


def test_stdout_head_failure_is_command_failed() -> None:
    with pytest.raises(CommandFailed, match=r"cat failed \(exit 1\): .*No such file"):
        run_head(["cat", "/nonexistent/file"], 10)


# ---------------------------------------------------------------- reports


def test_report_types(images: dict[str, Path]) -> None:
    report = inspect_image(images["xz"])
    assert isinstance(report, ImageReport)
    assert isinstance(report.content, SquashfsReport)
    assert isinstance(report.content.rootfs, Ext4Report)
    assert report.content.rootfs.info.files == 11


def test_command_is_registered() -> None:
    from dmoverlay.cli import cli
    assert isinstance(cli, click.Group)
    assert cli.get_command(click.Context(cli), "inspect") is command
