"""apply_update, the library's one entry point: an update named by its path
applied in order, and nothing left behind (staging, mount, journal) on any
path, whether it succeeds, is refused, or fails halfway."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dmoverlay.apply.update import ApplyOptions, ApplyRefused, apply_update, rollback
from dmoverlay.core.errors import DmoverlayError, ImageError, SourceError, WriteFailed
from tests.applykit import make_root, snapshot


def _tree(top: Path) -> Path:
    tree = top / "update"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/libfoo.so").write_bytes(b"fixed\n")
    (tree / "opt/app").mkdir(parents=True)
    (tree / "opt/app/run").write_bytes(b"#!/bin/sh\n")
    os.setxattr(tree / "opt/app/run", "user.origin", b"update")
    return tree


def _tar(tree: Path, out: Path) -> Path:
    subprocess.run(["tar", "--create", "--format=posix", "--xattrs", "--xattrs-include=*",
                    "-f", str(out), "-C", str(tree), "."], check=True)
    return out


def _left_behind(run: Path) -> list[str]:
    """What an apply left under the run directory and in the mount table."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if f" {run}" in line]
    return [p.name for p in run.iterdir() if p.name == "dmoverlay"] + mounts


def _applied(root: Path) -> None:
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"fixed\n"
    assert os.getxattr(root / "opt/app/run", "user.origin") == b"update"


@pytest.mark.parametrize("kind", ["directory", "tar"])
def test_an_update_is_applied_and_undone(tmp_path: Path, kind: str) -> None:
    root, run = make_root(tmp_path / "live")
    before = snapshot(root), snapshot(run)
    tree = _tree(tmp_path)
    spec = tree if kind == "directory" else _tar(tree, tmp_path / "u.tar")
    result = apply_update(str(spec), ApplyOptions(root=root, run_dir=run))
    assert (result.txn, result.written, result.dry_run) == ("000001", 2, False)
    _applied(root)
    assert _left_behind(run) == []
    assert rollback(ApplyOptions(root=root, run_dir=run)) == "000001"
    assert (snapshot(root), snapshot(run)) == before


def test_a_dry_run_changes_nothing(tmp_path: Path) -> None:
    root, run = make_root(tmp_path / "live")
    before = snapshot(root), snapshot(run)
    result = apply_update(str(_tree(tmp_path)), ApplyOptions(root=root, run_dir=run,
                                                             dry_run=True))
    assert result.dry_run and result.txn == "" and result.written == 0
    assert result.to_dict()["dry_run"] is True
    assert (snapshot(root), snapshot(run)) == before
    assert _left_behind(run) == []


@pytest.mark.root
def test_an_image_stays_mounted_while_it_is_applied(tmp_path: Path) -> None:
    """An image's file data is copied from the mounted image, during the
    apply: unmounted before, the copy would fail."""
    root, run = make_root(tmp_path / "live")
    image = tmp_path / "update.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(_tree(tmp_path)), str(image)],
                   check=True)
    apply_update(str(image), ApplyOptions(root=root, run_dir=run))
    _applied(root)
    assert _left_behind(run) == []


def _fail_setxattr(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.setxattr

    def setxattr(target: object, key: str, value: bytes, *args: object,
                 **kwargs: object) -> None:
        if key == "user.origin":
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real(target, key, value, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "setxattr", setxattr)


@pytest.mark.parametrize("failure", ["damaged", "refused", "no-room", "write"])
def test_a_failing_update_leaves_nothing(tmp_path: Path, failure: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, run = make_root(tmp_path / "live")
    tree = _tree(tmp_path)
    archive = _tar(tree, tmp_path / "u.tar")
    spec = str(archive)
    cow_free: Callable[[str], int | None] = lambda _: None  # noqa: E731
    error: type[DmoverlayError] = WriteFailed
    if failure == "damaged":
        archive.write_bytes(archive.read_bytes()[:1500])
        error = SourceError
    elif failure == "refused":
        (tree / "tmp").mkdir()
        spec, error = str(tree), ApplyRefused
    elif failure == "no-room":
        cow_free, error = (lambda _: 1), ImageError
    else:
        os.setxattr(root / "usr/lib/libfoo.so", "user.keep", b"old")
        _fail_setxattr(monkeypatch)
    before = snapshot(root), snapshot(run)
    with pytest.raises(error):
        apply_update(spec, ApplyOptions(root=root, run_dir=run), cow_free=cow_free)
    assert (snapshot(root), snapshot(run)) == before
    assert _left_behind(run) == [] and not (root / ".dmoverlay").exists()
