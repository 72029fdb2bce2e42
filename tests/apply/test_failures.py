"""A system call that fails while an update is written ends in the undo and
one error line, never a traceback; the staging directory under the run
directory is never reached through a link."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import replace
from pathlib import Path

import pytest

from dmoverlay.apply.execute import ApplyOptions, rollback, staging
from dmoverlay.core.errors import UsageError, WriteFailed
from tests.applykit import apply, d, f, make_root, snapshot

# Write-time failures the planner cannot foresee (a filesystem without ACLs, an
# xattr over what this filesystem keeps), injected where the kernel would give them:
# planning refuses every value it knows to be bad (tests/apply/test_plan_hostile.py).
FAILURES = {"too-big": errno.E2BIG, "no-support": errno.EOPNOTSUPP, "invalid": errno.EINVAL}


def _failing_setxattr(monkeypatch: pytest.MonkeyPatch, fail: dict[str, int]) -> None:
    real = os.setxattr

    def setxattr(target: object, key: str, value: bytes, *args: object,
                 **kwargs: object) -> None:
        if key in fail:
            raise OSError(fail[key], os.strerror(fail[key]))
        real(target, key, value, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "setxattr", setxattr)  # forked writers inherit it


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failed_write_is_undone_and_one_error(tmp_path: Path, case: str, jobs: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root, run = make_root(tmp_path / "live")
    before = snapshot(root), snapshot(run)
    _failing_setxattr(monkeypatch, {"user.fails": FAILURES[case]})
    files = [f(f"usr/lib/mod/f{i}", b"x") for i in range(20)]
    files.insert(10, f("usr/lib/mod/bad", b"bad", xattrs=(("user.fails", b"1"),)))
    with pytest.raises(WriteFailed) as caught:
        apply(tmp_path, root, run, [d("usr/lib/mod"), *files, f("etc/os-release", b"ID=new\n")],
              jobs=jobs)
    assert caught.value.message == \
        f"cannot apply usr/lib/mod/bad (/usr/lib/mod/bad): {os.strerror(FAILURES[case])}"
    assert caught.value.hint is not None and "nothing was changed" in caught.value.hint
    assert (snapshot(root), snapshot(run)) == before
    assert not (root / ".dmoverlay").exists()


def test_a_failed_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, run = make_root(tmp_path / "live")
    before = snapshot(root)
    _failing_setxattr(monkeypatch, {"user.fails": errno.E2BIG})
    member, data = d("opt/app")
    bad = replace(member, xattrs=(("user.fails", b"1"),))
    with pytest.raises(WriteFailed, match=r"^cannot apply opt/app \(/opt/app\): Argument"):
        apply(tmp_path, root, run, [(bad, data), f("opt/app/x")])
    assert snapshot(root) == before


@pytest.mark.parametrize("planted", ["symlink", "file", "open-to-all", "not-ours"])
def test_the_staging_directory_must_be_ours(tmp_path: Path, planted: str) -> None:
    """RUNDIR/dmoverlay planted as a link moved the staging (and the data of
    the update) wherever it pointed."""
    root, run = make_root(tmp_path / "live")
    outside = tmp_path / "outside"
    outside.mkdir()
    base = run / "dmoverlay"
    if planted == "symlink":
        os.symlink(outside, base)
    elif planted == "file":
        base.write_bytes(b"")
    else:
        base.mkdir()
        if planted == "open-to-all":
            os.chmod(base, 0o777)
        else:
            os.chown(base, 1000, 1000)
    with pytest.raises(UsageError, match="dmoverlay"), staging(ApplyOptions(root, run)):
        pass
    assert list(outside.iterdir()) == []
    assert base.is_symlink() or base.exists()  # left as it was


def test_the_staging_directory_is_made_and_removed(tmp_path: Path) -> None:
    root, run = make_root(tmp_path / "live")
    with staging(ApplyOptions(root, run)) as place:
        assert place.parent == run / "dmoverlay"
        assert place.stat().st_mode & 0o777 == 0o700
        (place / "spooled").write_bytes(b"data")
    assert not (run / "dmoverlay").exists()
    (run / "dmoverlay").mkdir(mode=0o700)  # one kept from before stays
    with staging(ApplyOptions(root, run)):
        pass
    assert list((run / "dmoverlay").iterdir()) == []


def test_one_apply_at_a_time(tmp_path: Path) -> None:
    """A second apply beside a running one took the first one's journal for
    one a crash left, and undid it under its feet."""
    root, run = make_root(tmp_path / "live")
    before = snapshot(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running apply holds it
        for job in (lambda: apply(tmp_path, root, run, [f("etc/x")]),
                    lambda: rollback(ApplyOptions(root, run))):
            with pytest.raises(UsageError, match="another dmoverlay apply or rollback"):
                job()
    finally:
        os.close(fd)
    assert snapshot(root) == before
    apply(tmp_path, root, run, [f("etc/x")])
