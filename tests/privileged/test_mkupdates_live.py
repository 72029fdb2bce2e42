"""`dmoverlay mkupdates --from-live` on the real kernel: an overlay set up
from an image `build` made, a fix tried under its root, and the update made
from it turns a copy of the base into the live view, entry by entry."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.mkupdates.treekit import snapshot
from tests.privileged.conftest import cli, error_line, resources, setup_args

pytestmark = pytest.mark.privileged


def _try_a_fix(root: Path) -> None:
    """A changed file, a new one, a deleted one, a symlink, a new directory
    with a file, and a mode changed."""
    (root / "etc/os-release").write_text("NAME=Sample\nID=sample\nVERSION=2\n")
    (root / "etc/new.conf").write_text("new\n")
    (root / "etc/empty").unlink()
    os.symlink("libfoo.so.1", root / "usr/lib/libfoo.so")
    (root / "opt/fix").mkdir(parents=True)
    (root / "opt/fix/run").write_bytes(b"#!/bin/sh\necho fixed\n")
    os.chmod(root / "opt/fix/run", 0o755)
    os.chmod(root / "usr/bin/tool", 0o700)


def _entries(top: Path) -> tuple[dict[str, object], set[frozenset[str]]]:
    seen, groups = snapshot(top)
    return ({k: v for k, v in seen.items() if k != "lost+found" and
             not k.startswith("lost+found/")},
            {g for g in groups if not any(n.startswith("lost+found/") for n in g)})


def test_from_live_applied_to_the_base_gives_the_live_view(
        images: dict[str, Path], place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M"))
    root, top = place["target"], place["top"]
    live = ["--from-live", str(place["name"]), "--state-dir", str(place["state"])]
    _try_a_fix(root)
    # a filesystem mounted on the live root is no part of it
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "var/log")],
                   check=True)
    try:
        (root / "var/log/messages").write_text("churn\n")
        before = resources()
        listed = cli("mkupdates", *live, "--dry-run")
        assert listed.stdout.splitlines() == [
            "whiteout\tetc/empty", "file\tetc/new.conf", "file\tetc/os-release",
            "dir\topt", "dir\topt/fix", "file\topt/fix/run",
            "file\tusr/bin/tool", "hardlink\tusr/bin/tool-again", "symlink\tusr/lib/libfoo.so"]
        cli("mkupdates", *live, "-o", str(top / "u.img"))
        assert resources() == before, "the base and the bind are let go"
        ours = f".live-{place['name']}-"
        assert not [p for p in place["state"].iterdir() if p.name.startswith(ours)]
    finally:
        subprocess.run(["umount", str(root / "var/log")], check=True)
    copy = top / "copy"
    subprocess.run(["cp", "-a", str(images["tree"]), str(copy)], check=True)
    (top / "run").mkdir()
    cli("apply", str(top / "u.img"), "--root", str(copy), "--run-dir", str(top / "run"))
    assert _entries(copy) == _entries(root)


def test_from_live_refuses_an_output_on_the_live_root(images: dict[str, Path],
                                                      place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "32M"))
    before = resources()
    result = cli("mkupdates", "--from-live", str(place["name"]), "--state-dir",
                 str(place["state"]), "-o", str(place["target"] / "u.img"), check=False)
    assert "is on the live root" in error_line(result)
    assert resources() == before
    assert not (place["target"] / "u.img").exists()
