"""mkupdates on real trees: the three formats read back by the tools that
read them (GNU cpio and tar, apply), the same bytes for the same input, and
what apply would refuse refused before anything is written."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from dmoverlay.apply.execute import ApplyRefused
from dmoverlay.apply.update import ApplyOptions, apply_update
from dmoverlay.build.image import BuildOptions
from dmoverlay.build.image import build as build_image
from dmoverlay.core.errors import DmoverlayError, ImageError, SourceError, UsageError
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.make import Made, MkupdatesOptions, make_updates
from tests.deeptree import chain
from tests.mkupdates.treekit import Node, build, snapshot

SAMPLE = {
    "usr": Node("dir", 0o755), "usr/lib": Node("dir", 0o755),
    "usr/lib/libfoo.so.1": Node("file", 0o755, 0, b"new libfoo\n", group=1),
    "usr/lib/libfoo.so": Node("file", 0o755, 0, b"new libfoo\n", group=1),
    "usr/lib/libbar.so": Node("link", 0o777, 0, b"libfoo.so"),
    "etc": Node("dir", 0o755), "etc/app.conf": Node("file", 0o640, 1000, b"x=1\n"),
}


def make(new: Path, out: Path | None, **kw: object) -> Made:
    return make_updates(MkupdatesOptions(new=str(new), output=out, **kw))  # type: ignore[arg-type]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".mkupdates-"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    build(tmp_path / "tree", SAMPLE)
    return tmp_path / "tree"


def test_cpio_is_what_gnu_cpio_extracts(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "updates.img"
    make(tree, out)
    head = out.read_bytes()[:10]
    assert head[3] == 0 and head[4:8] == b"\0\0\0\0"  # gzip: no name, no mtime
    (tmp_path / "x").mkdir()
    subprocess.run(f"gzip -dc {out} | cpio --quiet -idm --no-absolute-filenames",
                   shell=True, cwd=tmp_path / "x", check=True)
    assert snapshot(tmp_path / "x") == snapshot(tree)  # the hardlink kept


def test_tar_zst_carries_xattrs_gnu_tar_reads(tmp_path: Path) -> None:
    build(tmp_path / "tree", {"a": Node("file", 0o644, 0, b"1", (("user.k", b"\xff\x00v"),))})
    out = tmp_path / "u.tar.zst"
    make(tmp_path / "tree", out, format=Format.TAR_ZST)
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "--zstd", "--xattrs", "--xattrs-include=*", "-xf", out,
                    "-C", tmp_path / "x"], check=True)
    assert os.getxattr(tmp_path / "x/a", "user.k") == b"\xff\x00v"
    with tarfile.open(fileobj=io.BytesIO(subprocess.run(
            ["zstd", "-dc", out], capture_output=True, check=True).stdout)) as t:
        assert [(m.name, m.uname, m.gname) for m in t] == [(".", "", ""), ("a", "", "")]


@pytest.mark.parametrize("fmt", list(Format))
def test_the_same_input_gives_the_same_bytes(fmt: Format, tmp_path: Path) -> None:
    """The tree made again later (new times, new inodes) with
    SOURCE_DATE_EPOCH before both."""
    outs = []
    for n in (1, 2):
        build(tmp_path / f"tree{n}", SAMPLE)
        outs.append(tmp_path / f"u{n}")
        make(tmp_path / f"tree{n}", outs[-1], format=fmt, epoch=1_000_000_000)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_times_are_kept_without_an_epoch_and_clamped_with_one(tree: Path,
                                                              tmp_path: Path) -> None:
    os.utime(tree / "etc/app.conf", (500, 500))
    for epoch, want in ((None, 500), (100, 100)):
        out = tmp_path / f"u{epoch}"
        make(tree, out, format=Format.TAR_ZST, epoch=epoch)
        data = subprocess.run(["zstd", "-dc", out], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            assert t.getmember("etc/app.conf").mtime == want


@pytest.mark.parametrize("fmt", list(Format))
def test_applied_onto_old_gives_new_in_each_format(fmt: Format, tmp_path: Path) -> None:
    old = {**SAMPLE, "etc/gone": Node("file"), "usr/lib/libfoo.so.1": Node("file", data=b"o")}
    build(tmp_path / "old", old)
    build(tmp_path / "new", SAMPLE)
    (tmp_path / "run").mkdir()
    out = tmp_path / "u"
    make(tmp_path / "new", out, old=str(tmp_path / "old"), format=fmt)
    apply_update(str(out), ApplyOptions(root=tmp_path / "old", run_dir=tmp_path / "run"))
    assert snapshot(tmp_path / "old") == snapshot(tmp_path / "new")


def test_sides_may_be_tarballs(tmp_path: Path) -> None:
    build(tmp_path / "old", {**SAMPLE, "etc/gone": Node("file")})
    build(tmp_path / "new", SAMPLE)
    for side in ("old", "new"):
        subprocess.run(["tar", "-czf", tmp_path / f"{side}.tar.gz", "-C", tmp_path / side,
                        "."], check=True)
    out = tmp_path / "u.img"
    made = make(tmp_path / "new.tar.gz", out, old=str(tmp_path / "old.tar.gz"))
    assert made.lines() == ["whiteout\tetc/gone"]
    (tmp_path / "run").mkdir()
    apply_update(str(out), ApplyOptions(root=tmp_path / "old", run_dir=tmp_path / "run"))
    assert snapshot(tmp_path / "old") == snapshot(tmp_path / "new")


@pytest.mark.parametrize(("extra", "why"), [
    ({"dev": Node("dir"), "dev/x": Node("file")}, "writes under /dev"),
    ({"a": Node("file", 0o4755)}, "a setuid/setgid file"),
    ({"etc/.wh.x": Node("file")}, "which apply reads as a whiteout"),
    ({".dmoverlay-x": Node("file")}, "a name dmoverlay keeps"),
])
def test_what_apply_refuses_is_refused_and_nothing_is_written(
        extra: dict[str, Node], why: str, tmp_path: Path) -> None:
    build(tmp_path / "tree", {**SAMPLE, **extra})
    with pytest.raises(DmoverlayError, match=why):
        make(tmp_path / "tree", tmp_path / "u.img")
    assert not (tmp_path / "u.img").exists() and leftovers(tmp_path) == []


def test_device_nodes_and_fifos_are_refused(tmp_path: Path) -> None:
    build(tmp_path / "tree", SAMPLE)
    os.mkfifo(tmp_path / "tree/fifo")
    with pytest.raises(ApplyRefused, match="device nodes, fifos and sockets are refused"):
        make(tmp_path / "tree", None)


def test_setuid_with_the_flag_apply_needs_too(tmp_path: Path) -> None:
    build(tmp_path / "tree", {"a": Node("file", 0o4755)})
    make(tmp_path / "tree", tmp_path / "u.img", allow_setuid=True)
    assert (tmp_path / "u.img").exists()


def test_cpio_refuses_xattrs_it_would_lose_unless_told_to_leave_them(tmp_path: Path) -> None:
    build(tmp_path / "tree", {"a": Node("file", xattrs=(("user.k", b"v"),))})
    with pytest.raises(ApplyRefused, match=r"xattrs \(user.k\), which cpio \(newc\) cannot"):
        make(tmp_path / "tree", tmp_path / "u.img")
    assert not (tmp_path / "u.img").exists()
    make(tmp_path / "tree", tmp_path / "u.img", no_xattrs=True)


def test_squashfs_refuses_a_whiteout_its_sorted_walk_would_read_too_late(
        tmp_path: Path) -> None:
    """A mounted image is read in name order: `.wh.-x` after `-x`, so apply
    would see the whiteout of what the update itself made.  An archive
    keeps the order mkupdates chose."""
    build(tmp_path / "old", {"-x": Node("dir")})
    build(tmp_path / "new", {"-x": Node("file")})
    with pytest.raises(ApplyRefused, match="which the update itself creates"):
        make(tmp_path / "new", tmp_path / "u", old=str(tmp_path / "old"),
             format=Format.SQUASHFS)
    make(tmp_path / "new", tmp_path / "u", old=str(tmp_path / "old"))


def test_squashfs_of_a_tree_deeper_than_python_recurses(tmp_path: Path) -> None:
    """1,500 levels staged for mksquashfs: removing the work directory was
    a RecursionError's traceback once the image was in place (and staging
    looked every level up again for each member below it: 113 s)."""
    depth = 1500
    (tmp_path / "new").mkdir()
    with chain(tmp_path / "new", depth, leaf="f"):
        made = make(tmp_path / "new", tmp_path / "u.img", format=Format.SQUASHFS)
    assert leftovers(tmp_path) == []
    listing = subprocess.run(["unsquashfs", "-l", "-d", "", tmp_path / "u.img"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert "/" + "/".join(["d"] * depth + ["f"]) in listing
    assert len(made.members) == depth + 1


def test_an_existing_output_needs_force(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.img"
    out.write_bytes(b"mine")
    with pytest.raises(UsageError, match="exists"):
        make(tree, out)
    assert out.read_bytes() == b"mine"
    make(tree, out, force=True)
    assert out.read_bytes() != b"mine" and leftovers(tmp_path) == []


def test_the_output_may_not_be_inside_the_tree(tree: Path) -> None:
    with pytest.raises(UsageError, match="inside"):
        make(tree, tree / "etc/u.img")


def test_an_identical_difference_is_still_an_update(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.img"
    made = make(tree, out, old=str(tree))
    assert made.lines() == []
    apply_update(str(out), ApplyOptions(root=tree, run_dir=None, dry_run=True))


def _tar(path: Path, members: list[tuple[str, bytes | str]]) -> None:
    """A tar archive as a hostile or careless writer makes one: a str is a
    hardlink to that name."""
    with tarfile.open(path, "w") as t:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if isinstance(body, str):
                info.type, info.linkname = tarfile.LNKTYPE, body
                t.addfile(info)
            else:
                info.size = len(body)
                t.addfile(info, io.BytesIO(body))


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a//b", "a/./b", "a\nb"])
def test_a_side_with_a_name_apply_would_refuse_is_refused(name: str, tmp_path: Path) -> None:
    _tar(tmp_path / "bad.tar", [(name, b"1")])
    build(tmp_path / "tree", {"a": Node("file")})
    for new, old in ((tmp_path / "bad.tar", None), (tmp_path / "tree", tmp_path / "bad.tar")):
        with pytest.raises(SourceError, match=r"bad\.tar"):
            make(new, tmp_path / "u", old=str(old) if old else None)
    assert leftovers(tmp_path) == []


def test_a_name_given_twice_keeps_the_data_of_each(tmp_path: Path) -> None:
    """`b` links to the first `a`; the later `a` wins its name, not `b`'s data."""
    _tar(tmp_path / "new.tar", [("a", b"first"), ("b", "a"), ("a", b"second")])
    out = tmp_path / "u.tar.zst"
    make(tmp_path / "new.tar", out, format=Format.TAR_ZST)
    data = subprocess.run(["zstd", "-dc", out], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        got = {m.name: t.extractfile(m).read() for m in t if m.isfile()}  # type: ignore[union-attr]
    assert got == {"a": b"second", "b": b"first"}


def test_the_journal_of_a_root_apply_wrote_to_is_no_part_of_a_side(tree: Path,
                                                                    tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    build(tmp_path / "new", {**SAMPLE, "etc/more": Node("file")})
    first = tmp_path / "u1"
    make(tmp_path / "new", first, old=str(tree))
    apply_update(str(first), ApplyOptions(root=tree, run_dir=tmp_path / "run"))
    assert (tree / ".dmoverlay").is_dir()
    made = make(tmp_path / "new", None, old=str(tree))
    assert made.lines() == []


@pytest.mark.root
def test_old_may_be_a_live_image_build_made(tmp_path: Path) -> None:
    """Its squashfs.img, and the rootfs.img in it, mounted in turn."""
    build(tmp_path / "old", {**SAMPLE, "etc/gone": Node("file")})
    build(tmp_path / "new", {**SAMPLE, "etc/app.conf": Node("file", 0o600, 1000, b"x=2\n")})
    build_image(BuildOptions(source=tmp_path / "old", output=tmp_path / "squashfs.img",
                             free=16 << 20))
    made = make(tmp_path / "new", tmp_path / "u.img", old=str(tmp_path / "squashfs.img"))
    assert made.lines() == [
        "file\tetc/app.conf", "whiteout\tetc/gone"]
    (tmp_path / "run").mkdir()
    apply_update(str(tmp_path / "u.img"),
                 ApplyOptions(root=tmp_path / "old", run_dir=tmp_path / "run"))
    assert snapshot(tmp_path / "old") == snapshot(tmp_path / "new")


@pytest.mark.root
def test_a_link_named_liveos_is_not_followed_out_of_the_image(tree: Path, tmp_path: Path) -> None:
    """An image whose LiveOS is a link to a directory of this machine that
    holds a rootfs.img is read as what it holds: a link."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(elsewhere / "rootfs.img"), "8M"],
                   check=True)
    (tmp_path / "top").mkdir()
    os.symlink(elsewhere, tmp_path / "top/LiveOS")
    subprocess.run(["mksquashfs", str(tmp_path / "top"), str(tmp_path / "old.img"),
                    "-noappend", "-quiet", "-no-progress"], check=True, stdout=subprocess.DEVNULL)
    made = make(tree, None, old=str(tmp_path / "old.img"))
    assert "whiteout\tLiveOS" in made.lines()
    assert "file\tetc/app.conf" in made.lines()


@pytest.mark.root
def test_a_full_disk_is_one_error_and_leaves_nothing(tree: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], check=True)
    try:
        (tree / "big").write_bytes(os.urandom(256 * 1024))
        with pytest.raises(ImageError, match="No space left") as caught:
            make(tree, small / "u.img")
        assert caught.value.hint == "free some space or write it elsewhere"
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", small], check=True)


def test_a_full_disk_while_a_compressed_side_is_spooled_is_one_error(tmp_path: Path) -> None:
    """A compressed archive's files are spooled beside the output as they
    are read, before anything is written: a full disk there is one error
    line too, not a traceback, and nothing is left."""
    with tarfile.open(tmp_path / "new.tar.gz", "w:gz") as t:
        data = os.urandom(256 * 1024)
        info = tarfile.TarInfo("big")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], check=True)
    try:
        with pytest.raises(ImageError, match=r"^cannot keep the data of big in .*: No space "
                                             r"left on device$") as caught:
            make(tmp_path / "new.tar.gz", small / "u.img")
        assert caught.value.hint == "free some space beside the output, or write it elsewhere"
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", small], check=True)


@pytest.mark.parametrize("mtime", [-5, 2**33])
def test_squashfs_refuses_a_time_it_cannot_hold(tmp_path: Path, mtime: int) -> None:
    """squashfs keeps 32-bit seconds: -5 was written as 2106 (an image that
    differs from NEW), 2**33 stopped mksquashfs with its own words."""
    with tarfile.open(tmp_path / "new.tar", "w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("d")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1000
        t.addfile(info)
        info = tarfile.TarInfo("d/f")
        info.size, info.mtime = 2, mtime
        t.addfile(info, io.BytesIO(b"x\n"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ApplyRefused) as caught:
        make(tmp_path / "new.tar", out / "u.img", format=Format.SQUASHFS)
    [refusal] = caught.value.plan.refusals
    assert (refusal.name, refusal.reason, refusal.hint) == \
        ("d/f", "a time outside squashfs's 1970-2106", "use --format tar.zst")
    assert list(out.iterdir()) == []
    made = make(tmp_path / "new.tar", out / "u.tar.zst", format=Format.TAR_ZST)
    assert made.output == out / "u.tar.zst"


def test_cpio_refuses_a_link_target_no_kernel_makes(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "new.tar", "w") as t:
        info = tarfile.TarInfo("l")
        info.type, info.linkname = tarfile.SYMTYPE, "x" * 5000
        t.addfile(info)
    with pytest.raises(ApplyRefused, match="symlink target longer than 4095"):
        make(tmp_path / "new.tar", tmp_path / "u.img")
