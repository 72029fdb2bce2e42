"""mkupdates run by a user (no root) on the squashfs.img files build made:
the update is the one made from the trees, byte for byte; what a user
cannot read is one error line, never an update with it left out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmoverlay.build.image import BuildOptions
from dmoverlay.build.image import build as build_image
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.make import MkupdatesOptions, make_updates
from tests.mkupdates.treekit import Node, Spec, build
from tests.samples import CAPABILITY
from tests.unprivileged import as_user

pytestmark = pytest.mark.root  # to make the trees and images; the user reads them

OLD: Spec = {
    "usr": Node("dir", 0o755), "usr/lib": Node("dir", 0o755),
    "usr/lib/libfoo.so.1": Node("file", 0o755, 0, b"old libfoo\n", group=1),
    "usr/lib/libfoo.so": Node("file", 0o755, 0, b"old libfoo\n", group=1),
    "usr/bin": Node("dir", 0o755),
    "usr/bin/ping": Node("file", 0o755, 0, b"ping 1\n", xattrs=(
        ("security.capability", CAPABILITY),)),
    "etc": Node("dir", 0o755), "etc/gone": Node("file", 0o644, 0, b"bye\n"),
    "etc/shadow": Node("file", 0o000, 0, b"root:*:1::::::\n"),
    "home": Node("dir", 0o755), "home/u": Node("dir", 0o700, 1000),
    "home/u/notes with spaces & \"quotes\" #1": Node("file", 0o600, 1000, b"a\n"),
}
NEW: Spec = {
    **{k: v for k, v in OLD.items() if k != "etc/gone"},
    "usr/lib/libfoo.so.1": Node("file", 0o755, 0, b"new libfoo\n", group=1),
    "usr/lib/libfoo.so": Node("file", 0o755, 0, b"new libfoo\n", group=1),
    "usr/lib/libbar.so": Node("link", 0o777, 0, b"libfoo.so"),
    "usr/bin/ping": Node("file", 0o755, 0, b"ping 2\n", xattrs=(
        ("security.capability", CAPABILITY), ("user.origin", b"fix #12"))),
    "etc/shadow": Node("file", 0o000, 0, b"root:*:2::::::\n"),
    "home/u/ünïcödé\\back": Node("file", 0o640, 1000, b"b\n"),
}


def images(shared: Path, old: Spec, new: Spec) -> tuple[Path, Path]:
    for name, spec in (("old", old), ("new", new)):
        build(shared / name, spec)
        build_image(BuildOptions(source=shared / name, output=shared / f"{name}.img",
                                 free=8 << 20))
        os.chmod(shared / f"{name}.img", 0o644)
    out = shared / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    return shared / "old.img", shared / "new.img"


def test_a_user_makes_from_images_what_root_makes_from_trees(shared_dir: Path) -> None:
    old, new = images(shared_dir, OLD, NEW)
    trees = shared_dir / "trees.tar.zst"
    made = make_updates(MkupdatesOptions(new=str(shared_dir / "new"), output=trees,
                                         old=str(shared_dir / "old"), format=Format.TAR_ZST,
                                         allow_setuid=True))
    assert "whiteout\tetc/gone" in made.lines()
    assert "file\tetc/shadow" in made.lines()  # mode 000: read all the same
    got = as_user("mkupdates", "--from", old, "--to", new, "--format", "tar.zst",
                  "--allow-setuid", "-o", shared_dir / "out/u.tar.zst", shared=shared_dir)
    assert got.returncode == 0, got.stderr
    assert (shared_dir / "out/u.tar.zst").read_bytes() == trees.read_bytes()
    assert os.listdir(shared_dir / "out") == ["u.tar.zst"]


def test_an_xattr_only_root_may_read_is_one_error(shared_dir: Path) -> None:
    new = {**NEW, "etc/marked": Node("file", 0o644, 0, b"m\n", xattrs=(("trusted.x", b"1"),))}
    old_img, new_img = images(shared_dir, OLD, new)
    got = as_user("mkupdates", "--from", old_img, "--to", new_img, "--format", "tar.zst",
                  "--allow-setuid", "-o", shared_dir / "out/u.tar.zst", shared=shared_dir)
    assert got.returncode != 0
    errors = [line for line in got.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "etc/marked: its xattr trusted.x is for root only" in errors[0]
    assert "Traceback" not in got.stderr
    assert os.listdir(shared_dir / "out") == []


def test_without_fuse_a_user_gets_one_error_line(shared_dir: Path) -> None:
    old, new = images(shared_dir, OLD, NEW)
    got = as_user("mkupdates", "--from", old, "--to", new, "--format", "tar.zst",
                  "--allow-setuid", "-o", shared_dir / "out/u.tar.zst", shared=shared_dir,
                  fuse=False)
    assert got.returncode != 0
    assert [line for line in got.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {new}: reading an ext image without root needs FUSE, and /dev/fuse "
        "cannot be opened (it is not this user's)"]
    assert os.listdir(shared_dir / "out") == []
