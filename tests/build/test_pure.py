"""The pure parts of a build: sizes, names, times, the debugfs script and the
mksquashfs command line.  No tools run here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.build import debugfs, ext4
from dmoverlay.build.source import Entry, Tree, check_name, tar_path
from dmoverlay.build.squashfs import Compressor, SquashOptions, mksquashfs_argv
from dmoverlay.core.compress import Compression, detect
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import ImageError, SourceError, UsageError
from dmoverlay.core.sizes import GiB, KiB, MiB, format_size, parse_size

NS = 1_000_000_000


def tree(*entries: Entry, staged: bool = False) -> Tree:
    root = Entry("", Kind.DIR, 0o755, 0, 0, 5 * NS)
    return Tree(root=Path("/nowhere"), entries=[root, *entries], staged=staged)


def file(path: str, size: int = 0, **kw: object) -> Entry:
    return Entry(path, Kind.FILE, 0o644, 0, 0, 10 * NS, size=size, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------- sizes

@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("4K", 4 * KiB), ("512m", 512 * MiB), ("2G", 2 * GiB), ("1.5GiB", 3 * GiB // 2),
    ("1 T", 1024 * GiB), ("8MB", 8 * MiB),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "2X", "1e9", "lots"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 3 * MiB // 2, 5 * GiB, 2048 * GiB)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 GiB", "2.0 TiB"]


# ------------------------------------------------------------------- times

@pytest.mark.parametrize(("ns", "low", "extra"), [
    (0, 0, 0),
    (1_600_000_000 * NS + 123_456_789, 1_600_000_000, 123_456_789 << 2),
    (-1 * NS, 0xFFFFFFFF, 0),  # 1969: a negative 32-bit value, epoch bits 0
    (-(2**31) * NS, 0x80000000, 0),
    (2**31 * NS, 0x80000000, 1),  # 2038: past the signed 32-bit line
    (4_102_444_800 * NS, 4_102_444_800 - 2**32, 1),  # 2100
    ((2**32 + 5) * NS + 7, 5, (7 << 2) | 1),
])
def test_time_fields(ns: int, low: int, extra: int) -> None:
    assert debugfs.time_fields(ns) == (low & 0xFFFFFFFF, extra)


@given(st.integers(min_value=-(2**31), max_value=2**34 - 2**31 - 1),
       st.integers(min_value=0, max_value=NS - 1))
def test_time_fields_round_trip(seconds: int, nanos: int) -> None:
    """Decoding as the kernel does gives back the time we encoded."""
    low, extra = debugfs.time_fields(seconds * NS + nanos)
    signed = low - 2**32 if low & 0x80000000 else low
    assert signed + ((extra & 3) << 32) == seconds
    assert extra >> 2 == nanos


# ------------------------------------------------------------------- names

@pytest.mark.parametrize(("name", "path"), [
    ("./usr/bin/ls", "usr/bin/ls"), ("/etc/passwd", "etc/passwd"), ("a//b/./c/", "a/b/c"),
    ("./", ""), ("ünï cödé", "ünï cödé"),
    ("bad\nname", "bad\nname"), ("tab\there", "tab\there"), ("del\x7f", "del\x7f"),
])
def test_tar_path(name: str, path: str) -> None:
    assert tar_path(name) == path


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/..", "x" * 256])
def test_tar_path_refuses(name: str) -> None:
    with pytest.raises(SourceError):
        tar_path(name)


def test_name_length_counts_bytes() -> None:
    check_name("ok", "é" * 127)  # 254 bytes
    with pytest.raises(SourceError, match="255 bytes"):
        check_name("long", "é" * 128)


# ------------------------------------------------------------------- plan

def test_default_plan_leaves_two_gib_free() -> None:
    t = tree(file("big", 100 * MiB))
    p = ext4.plan(t, size=None, free=None, label="L", fs_uuid=None, epoch=1)
    use = ext4.usage(t)
    free = p.blocks - use.blocks - ext4.overhead_blocks(p.blocks, p.inodes)
    assert 2 * GiB <= free * ext4.BLOCK < 2 * GiB + 8 * MiB
    assert use.blocks * ext4.BLOCK >= 100 * MiB


def test_overhead_grows_with_backup_groups() -> None:
    # 4 GiB: 32 groups, 8 of them (0, 1, 3, 5, 7, 9, 25, 27) with superblock copies
    assert ext4.backup_groups(32) == 8
    small = ext4.overhead_blocks(1 << 18, 1 << 16)
    large = ext4.overhead_blocks(1 << 20, 1 << 16)
    assert large - small > 4 * ext4.reserved_gdt_blocks(1 << 20)


def test_plan_has_an_inode_for_every_entry_and_the_free_space() -> None:
    many = tree(*[file(f"f{i}", 1) for i in range(50_000)])
    p = ext4.plan(many, size=None, free=16 * MiB, label="L", fs_uuid=None, epoch=1)
    assert p.inodes >= 50_000 + 16 * MiB // ext4.INODE_RATIO


def test_plan_refuses_a_size_too_small() -> None:
    with pytest.raises(UsageError, match="too small"):
        ext4.plan(tree(file("big", 100 * MiB)), size=50 * MiB, free=None, label="L",
                  fs_uuid=None, epoch=1)


def test_plan_refuses_size_and_free_together() -> None:
    with pytest.raises(UsageError):
        ext4.plan(tree(), size=GiB, free=GiB, label="L", fs_uuid=None, epoch=1)


def test_uuid_is_derived_from_the_tree() -> None:
    def uuid_of(t: Tree) -> str:
        return ext4.plan(t, size=None, free=None, label="L", fs_uuid=None, epoch=1).uuid

    a = uuid_of(tree(file("a", 1)))
    assert a == uuid_of(tree(file("a", 1)))
    assert a != uuid_of(tree(file("a", 2)))
    assert a != uuid_of(tree(file("b", 1)))
    given_uuid = "0b9d3c2a-5e1f-4a57-8c0d-2f1e3d4c5b6a"
    p = ext4.plan(tree(), size=None, free=None, label="L", fs_uuid=given_uuid, epoch=1)
    assert p.uuid == given_uuid and p.hash_seed != given_uuid


def test_journal_size_follows_mke2fs() -> None:
    assert ext4.journal_blocks(20_000) == 1024
    assert ext4.journal_blocks(524_288) == 16384  # 2 GiB: 64 MiB
    assert ext4.journal_blocks(10**9) == 262144


def test_mkfs_command_pins_what_makes_images_reproducible(tmp_path: Path) -> None:
    p = ext4.plan(tree(), size=None, free=None, label="Live", fs_uuid=None, epoch=42)
    argv = ext4.mkfs_argv(p, tmp_path / "r.img", tmp_path / "tree")
    joined = " ".join(argv)
    assert f"-U {p.uuid}" in joined and f"hash_seed={p.hash_seed}" in joined
    assert "lazy_itable_init=0" in joined and "-L Live" in joined
    assert argv[-3:] == [str(tmp_path / "tree"), str(tmp_path / "r.img"), str(p.blocks)]
    env = ext4.mkfs_env(p)
    assert env["E2FSPROGS_FAKE_TIME"] == "42"
    assert Path(env["MKE2FS_CONFIG"]).is_file()


# ------------------------------------------------------------------- debugfs

def script(t: Tree, **kw: object) -> list[bytes]:
    """The fixup script, with inode numbers 100, 101, ... in manifest order."""
    inodes = {e.path: 100 + i for i, e in enumerate(t.entries)}
    return ext4.fixup_script(t, epoch=100, all_root=bool(kw.get("all_root")),
                             value_file={b"v": Path("/x/v0")}, inodes=inodes).splitlines()


def test_directory_tree_only_gets_times() -> None:
    lines = script(tree(file("f", 1)))
    on_f = [line for line in lines if line.startswith(b"sif <101>")]
    assert {line.split()[2] for line in on_f} == {
        b"mtime_lo", b"mtime_extra", b"atime_lo", b"atime_extra", b"ctime_lo", b"ctime_extra",
        b"crtime_lo", b"crtime_extra"}
    assert lines[0].startswith(b"sif <100> ")  # the root
    assert b"sif <101> mtime_lo 10" in lines
    assert b"sif <101> ctime_lo 100" in lines  # the build time, later than mtime


def test_all_root_sets_owners() -> None:
    lines = script(tree(Entry("f", Kind.FILE, 0o644, 1000, 1000, 0)), all_root=True)
    assert b"sif <101> uid 0" in lines and b"sif <101> gid 0" in lines


def test_staged_tree_gets_modes_owners_devices_and_xattrs() -> None:
    t = tree(
        Entry("dev", Kind.DIR, 0o755, 0, 0, 0),
        Entry("dev/null", Kind.CHAR, 0o666, 0, 0, 0, rdev=(1, 3)),
        Entry("run/fifo", Kind.FIFO, 0o600, 0, 0, 0),
        Entry("bin/ping", Kind.FILE, 0o4755, 0, 5, 0, xattrs=(("security.capability", b"v"),)),
        Entry("bin/ping2", Kind.FILE, 0o4755, 0, 5, 0, link_to="bin/ping"),
        staged=True,
    )
    lines = script(t)
    at = lines.index(b"cd <101>")  # into dev/, by number
    assert lines[at + 1:at + 4] == [b'rm "./null"', b'mknod "null" c 1 3',
                                    b'sif "./null" mode 020666']
    assert b"sif <103> mode 010600" in lines  # the fifo: made by mkfs from the staged one
    assert b"sif <104> mode 0104755" in lines
    assert b"sif <104> gid 5" in lines
    assert b'ea_set -f "/x/v0" <104> "security.capability"' in lines
    assert not any(b"<105>" in line for line in lines), "a hardlink's inode is set once"


def test_no_name_reaches_the_script_but_a_device_node_s() -> None:
    hostile = 'x\nsif <2> uid 0 "'
    t = tree(Entry(hostile, Kind.DIR, 0o755, 0, 0, 0),
             Entry(f"{hostile}/f", Kind.FILE, 0o644, 0, 0, 0,
                   xattrs=(("user.a b\"c", b"v"),)), staged=True)
    text = b"\n".join(script(t))
    assert b"<2>" not in text and b'0 "' not in text  # nothing of the name
    assert b'ea_set -f "/x/v0" <102> "user.a b""c"' in text


@pytest.mark.parametrize(("name", "words"), [
    ("user.x\ndump <2> /tmp/out", "control character"),
    ("nonamespace", "no namespace"),
    ("user.", "no namespace"),
    ("user." + "n" * 300, "longer than 255"),
])
def test_xattr_names_refused(name: str, words: str) -> None:
    t = tree(file("f", xattrs=((name, b"v"),)), staged=True)
    with pytest.raises(SourceError, match=words):
        script(t)


def test_device_node_named_with_a_newline_is_refused() -> None:
    t = tree(Entry("a\nb", Kind.CHAR, 0o666, 0, 0, 0, rdev=(1, 3)), staged=True)
    with pytest.raises(ImageError, match="newline"):
        script(t)


def test_lost_found_gets_the_build_time() -> None:
    assert b'sif "/lost+found" mtime_lo 100' in script(tree())


# ------------------------------------------------------------------- squashfs

def test_mksquashfs_command() -> None:
    argv = mksquashfs_argv(Path("/w/sq"), Path("/w/o.img"), SquashOptions(), epoch=7,
                           machine="x86_64")
    assert argv[:3] == ["mksquashfs", "/w/sq", "/w/o.img"]
    joined = " ".join(argv)
    assert "-mkfs-time 7 -all-time 7" in joined
    assert "-comp xz" in joined and "-Xbcj x86" in joined and "-b 131072" in joined
    arm = mksquashfs_argv(Path("s"), Path("o"), SquashOptions(), epoch=7, machine="aarch64")
    assert "-Xbcj" not in arm
    zstd = mksquashfs_argv(Path("s"), Path("o"), SquashOptions(Compressor.ZSTD, 19), epoch=7)
    assert re.search(r"-comp zstd .*-Xcompression-level 19", " ".join(zstd))


@pytest.mark.parametrize(("kw", "words"), [
    ({"compressor": Compressor.XZ, "level": 3}, "no compression level"),
    ({"compressor": Compressor.LZ4, "level": 3}, "no compression level"),
    ({"compressor": Compressor.GZIP, "level": 10}, "1 to 9"),
    ({"block_size": 2 * MiB}, "power of two"),
    ({"block_size": 3 * KiB}, "power of two"),
    ({"block_size": 96 * KiB}, "power of two"),
])
def test_squash_options_refused(kw: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        SquashOptions(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------- compression

@pytest.mark.parametrize(("head", "kind"), [
    (b"\x1f\x8b\x08\x00", Compression.GZIP), (b"\xfd7zXZ\x00\x00", Compression.XZ),
    (b"BZh91AY", Compression.BZIP2), (b"\x28\xb5\x2f\xfd\x00", Compression.ZSTD),
    (b"usr/\x00\x00", Compression.NONE), (b"", Compression.NONE),
])
def test_detect_compression(head: bytes, kind: Compression) -> None:
    assert detect(head) is kind


def test_a_device_named_like_an_inode_number_goes_by_path() -> None:
    """debugfs reads "<12>", quoted or not, as inode 12: after mknod, the
    node is named "./<12>"."""
    lines = script(tree(Entry("<12>", Kind.CHAR, 0o600, 0, 0, 0, rdev=(1, 3)), staged=True))
    assert b'rm "./<12>"' in lines and b'mknod "<12>" c 1 3' in lines
    assert b'sif "./<12>" mode 020600' in lines


def test_empty_directories_take_a_block_each() -> None:
    dirs = [Entry(f"d{i}", Kind.DIR, 0o755, 0, 0, 0) for i in range(3000)]
    assert ext4.usage(tree(*dirs)).blocks >= 3000
