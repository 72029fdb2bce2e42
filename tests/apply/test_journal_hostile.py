"""The journal is input: a root (from an image, or written by hand) may hold
any journal at all.  None may make an apply, a dry run or a rollback touch
anything outside the root, remove what the transaction did not make, or
leave the root where no later apply can run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dmoverlay.apply.execute import ApplyOptions, rollback
from dmoverlay.apply.journal import MAX_LOG, Record
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import DmoverlayError, JournalError
from tests.applykit import apply, d, f, make_root, other, snapshot
from tests.conftest import dmoverlay

TXN = ".dmoverlay/journal/000001"


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    root, run = make_root(tmp_path / "live")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"host file\n")
    return tmp_path, root, run, outside


def plant(root: Path, lines: list[str | dict[str, object]], txn: str = "000001") -> Path:
    """A journal as an image or a person could leave it (unfinished, unless
    the lines end in "done")."""
    journal = root / ".dmoverlay/journal" / txn
    journal.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    (journal / "log").write_text(text)
    return journal


def _rollback(root: Path, run: Path, top: Path) -> None:
    rollback(ApplyOptions(root, run))


def _apply(root: Path, run: Path, top: Path) -> None:
    apply(top, root, run, [f("etc/hello")])


def _dry_run(root: Path, run: Path, top: Path) -> None:
    apply(top, root, run, [f("etc/hello")], dry_run=True)


JOBS: list[Callable[[Path, Path, Path], None]] = [_rollback, _apply, _dry_run]
PUT = {"step": "put", "n": 1, "tree": "root", "path": "etc/os-release",
       "tmp": ".dmoverlay-000001-1"}
HOSTILE = {
    "tmp-dotdot": [{**PUT, "tmp": "../../../outside/victim"}],
    "tmp-absolute": [{**PUT, "tmp": "/nonexistent/../victim"}],
    "n-a-path": [{**PUT, "n": "../../../../../outside/victim"}],
    "path-dotdot": [{**PUT, "path": "../../outside/victim"}],
    "remove-dotdot": [{"step": "remove", "n": 1, "tree": "root", "path": "../../outside/victim"}],
    "mkdir-absolute": [{"step": "mkdir", "n": 1, "tree": "root", "path": "/outside"}],
}


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.__name__.strip("_"))
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_record_naming_a_place_outside_touches_nothing(
        live: tuple[Path, Path, Path, Path], case: str,
        job: Callable[[Path, Path, Path], None]) -> None:
    top, root, run, outside = live
    # what the old code met: the file the hostile record names, in place
    (root / "etc/.dmoverlay-000001-1").write_bytes(b"a user's file\n")
    plant(root, [{"step": "begin", "time_ns": 0}, *HOSTILE[case]])
    before = snapshot(top)
    with pytest.raises(JournalError) as caught:
        job(root, run, top)
    assert "000001/log: line 2" in caught.value.message
    assert snapshot(top) == before
    assert (outside / "victim").read_bytes() == b"host file\n"


@pytest.mark.parametrize("tree", ["root", "run"])
@pytest.mark.parametrize("level", [".dmoverlay", ".dmoverlay/journal"])
def test_a_journal_directory_that_is_a_link_is_refused(
        live: tuple[Path, Path, Path, Path], tree: str, level: str) -> None:
    """Planted in the image or in the run directory: the old code removed
    the directories it led to."""
    top, root, run, outside = live
    plant(root, [{"step": "begin", "time_ns": 0}])  # an unfinished transaction, in the root
    (outside / "journal/000001").mkdir(parents=True)
    (outside / "journal/000001/precious").write_bytes(b"keep me\n")
    (outside / "journal/000001/log").write_text("")
    (outside / "000001").mkdir()
    (outside / "000001/precious").write_bytes(b"keep me too\n")
    link = (root if tree == "root" else run) / level
    if link.exists():
        os.rename(link, link.with_name("moved"))
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, link)
    before = snapshot(top)
    for job in JOBS:
        with pytest.raises(JournalError, match="symlink, not a journal directory"):
            job(root, run, top)
        assert snapshot(top) == before


def test_a_dry_run_changes_nothing_not_even_recovery(live: tuple[Path, Path, Path, Path]) -> None:
    top, root, run, _ = live
    apply(top, root, run, [f("etc/os-release", b"ID=new\n"), d("opt"), f("opt/x")])
    log = root / TXN / "log"
    log.write_text(log.read_text().replace('{"step":"done"}\n', ""))  # as if cut short
    update = _tree(top, {"etc/hello": b"hi"})
    before = snapshot(root), snapshot(run)
    result = apply(top, root, run, [f("etc/hello")], dry_run=True)
    assert result.pending == ["000001"]
    assert (snapshot(root), snapshot(run)) == before
    cli = dmoverlay("apply", str(update), "--root", str(root), "--run-dir", str(run), "--dry-run")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines()[0].split() == ["undo", "unfinished", "transaction", "000001",
                                                  "(first)"]
    assert (snapshot(root), snapshot(run)) == before


def _tree(top: Path, files: dict[str, bytes]) -> Path:
    tree = top / "update"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    return tree


def _cli_rollback(root: Path, run: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmoverlay", "rollback", "--root", str(root),
                           "--run-dir", str(run)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


MALFORMED = {
    "n-a-string": '{"step":"put","n":"x","tree":"root","path":"etc/a","tmp":".dmoverlay-000001-x"}',
    "unknown-key": '{"step":"put","n":1,"tree":"root","path":"etc/a","tmp":"t","rm":"/"}',
    "a-list": "[1, 2, 3]",
    "null": "null",
    "deep": "[" * 50000 + "]" * 50000,
    "tree-missing": '{"step":"mkdir","n":1,"path":"etc/a"}',
    "ready-of-nothing": '{"step":"ready","n":9,"ino":1}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_record_is_one_error_line(live: tuple[Path, Path, Path, Path],
                                             case: str) -> None:
    """In the middle of the log: damage, not a crash (a torn last line is
    dropped on purpose)."""
    top, root, run, _ = live
    plant(root, [{"step": "begin", "time_ns": 0}, MALFORMED[case],
                 {"step": "times", "tree": "root", "atime_ns": 1, "mtime_ns": 1}])
    before = snapshot(top)
    line = _one_error(_cli_rollback(root, run))
    assert f"{root}/{TXN}/log: line 2" in line
    assert snapshot(top) == before


@pytest.mark.parametrize("what", ["fifo", "file", "huge", "not-ascii", "log-a-dir",
                                  "log-a-link"])
def test_a_journal_that_is_not_one_is_refused_at_once(live: tuple[Path, Path, Path, Path],
                                                     what: str) -> None:
    top, root, run, outside = live
    journal = root / TXN
    journal.parent.mkdir(parents=True)
    if what == "fifo":
        journal.mkdir()
        os.mkfifo(journal / "log")
    elif what == "file":
        journal.write_bytes(b"x")
    elif what == "huge":
        journal.mkdir()
        with open(journal / "log", "wb") as log:
            log.truncate(MAX_LOG + 1)
    elif what == "not-ascii":
        journal.mkdir()
        (journal / "log").write_bytes(b'{"step":"begin","time_ns":0}\n\xff\xfe\n')
    elif what == "log-a-dir":
        journal.mkdir()
        (journal / "log").mkdir()
    else:
        journal.mkdir()
        os.symlink(outside / "victim", journal / "log")
    before = snapshot(top)
    line = _one_error(_cli_rollback(root, run, timeout=30))  # a fifo must not hang it
    assert "000001" in line
    assert snapshot(top) == before


@pytest.mark.parametrize("name", ["9" * 255, "²", "١٢"])
def test_a_journal_name_no_apply_makes_is_left_alone(live: tuple[Path, Path, Path, Path],
                                                     name: str) -> None:
    """A hostile number: the next one would be too long a name; digits that
    are not ASCII are no number of ours."""
    top, root, run, _ = live
    plant(root, [{"step": "begin", "time_ns": 0}], txn=name)
    result = apply(top, root, run, [f("etc/hello")])
    assert result.txn == "000001"
    assert (root / ".dmoverlay/journal" / name).is_dir()


# ------------------------------------------------------------------ what was not ours


def test_a_users_file_named_like_a_temporary_stays(live: tuple[Path, Path, Path, Path]) -> None:
    top, root, run, _ = live
    users = root / "etc/.dmoverlay-000001-0"
    users.write_bytes(b"mine\n")
    before = snapshot(top)
    with pytest.raises(DmoverlayError, match="is in the way") as caught:
        apply(top, root, run, [f("etc/new"), f("etc/other")])
    assert "/etc/.dmoverlay-000001-0" in caught.value.message
    assert users.read_bytes() == b"mine\n"
    assert snapshot(top) == before


@pytest.mark.parametrize(("since", "kept"), [(10**20, True), (0, False)])
def test_a_temporary_no_record_names_is_removed_only_if_newer(
        live: tuple[Path, Path, Path, Path], since: int, kept: bool) -> None:
    """After a crash while files were written (no "ready" yet): a file of the
    temporary's name older than the transaction was not made by it."""
    _, root, run, _ = live
    tmp = root / "etc/.dmoverlay-000001-1"
    tmp.write_bytes(b"mine\n")
    plant(root, [PUT, {"step": "begin", "time_ns": since}])  # (an older dmoverlay stops at it)
    rollback(ApplyOptions(root, run))
    assert tmp.exists() is kept
    assert not (root / ".dmoverlay").exists()


def test_a_temporary_of_another_inode_stays(live: tuple[Path, Path, Path, Path]) -> None:
    _, root, run, _ = live
    tmp = root / "etc/.dmoverlay-000001-1"
    tmp.write_bytes(b"mine\n")
    plant(root, [PUT, {"step": "ready", "n": 1, "ino": tmp.stat().st_ino + 1}])
    rollback(ApplyOptions(root, run))
    assert tmp.read_bytes() == b"mine\n"


def test_recovery_leaves_an_entry_it_did_not_write(live: tuple[Path, Path, Path, Path]) -> None:
    """An unfinished apply whose new file was replaced meanwhile: the old
    code exchanged the replacement out and deleted it."""
    top, root, run, _ = live
    apply(top, root, run, [f("etc/os-release", b"ID=new\n"), f("etc/b")])
    log = root / TXN / "log"
    log.write_text(log.read_text().replace('{"step":"done"}\n', ""))
    (root / "etc/os-release.tmp").write_bytes(b"ID=mine\n")
    os.replace(root / "etc/os-release.tmp", root / "etc/os-release")
    result = apply(top, root, run, [f("etc/hello")])  # recovers, warns, goes on
    assert result.txn == "000001"
    assert (root / "etc/os-release").read_bytes() == b"ID=mine\n"
    assert not (root / "etc/b").exists()
    kept = root / ".dmoverlay/journal/000001.failed"
    assert sorted(p.name for p in kept.iterdir()) == ["0", "log"]
    assert (kept / "0").read_bytes() == b"ID=old\n"


# ------------------------------------------------------------------ whiteout, then the name


def test_a_directory_whited_out_and_made_again(live: tuple[Path, Path, Path, Path]) -> None:
    top, root, run, _ = live
    (root / "srv/data/sub").mkdir(parents=True)
    (root / "srv/data/old").write_bytes(b"old\n")
    (root / "srv/data/sub/deep").write_bytes(b"deep\n")
    before = snapshot(root)
    apply(top, root, run, [other("srv/.wh.data", Kind.FILE), f("srv/data/new", b"new\n"),
                           f("srv/data/old", b"again\n")])
    assert sorted(os.listdir(root / "srv/data")) == ["new", "old"]
    assert (root / "srv/data/old").read_bytes() == b"again\n"
    assert rollback(ApplyOptions(root, run)) == "000001"
    assert snapshot(root) == before


def test_a_linked_directory_whited_out_and_made_again(
        live: tuple[Path, Path, Path, Path]) -> None:
    top, root, run, _ = live
    before = snapshot(root)
    apply(top, root, run, [other(".wh.lib", Kind.FILE), f("lib/libnew.so", b"new\n")])
    assert not (root / "lib").is_symlink()
    assert os.listdir(root / "lib") == ["libnew.so"]
    assert (root / "usr/lib/libfoo.so").exists()
    rollback(ApplyOptions(root, run))
    assert snapshot(root) == before
    apply(top, root, run, [f("lib/libfoo.so", b"again\n")])
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"again\n"


# ------------------------------------------------------------------ changed since the apply


def _apply_some(top: Path, root: Path, run: Path) -> None:
    apply(top, root, run, [f("etc/os-release", b"ID=new\n"), f("etc/added", b"added\n"),
                           d("opt"), f("opt/x", b"x\n"), other("etc/.wh.keep.d", Kind.FILE)])


@pytest.mark.parametrize("change", ["modified", "replaced", "deleted", "holds new entries",
                                    "made again"])
def test_rollback_refuses_to_lose_changes_made_since(
        live: tuple[Path, Path, Path, Path], change: str) -> None:
    top, root, run, _ = live
    before = snapshot(root)
    _apply_some(top, root, run)
    if change == "modified":
        with open(root / "etc/added", "ab") as file:
            file.write(b"an edit\n")
        where = "/etc/added"
    elif change == "replaced":
        (root / "etc/os-release.new").write_bytes(b"ID=edited\n")
        os.replace(root / "etc/os-release.new", root / "etc/os-release")
        where = "/etc/os-release"
    elif change == "deleted":
        (root / "etc/os-release").unlink()
        where = "/etc/os-release"
    elif change == "holds new entries":
        (root / "opt/mine").write_bytes(b"mine\n")
        where = "/opt"
    else:
        (root / "etc/keep.d").mkdir()
        where = "/etc/keep.d"
    changed = snapshot(root)
    with pytest.raises(DmoverlayError, match="changed since it was applied") as caught:
        rollback(ApplyOptions(root, run))
    assert f"{root}{where} ({change})" in caught.value.message
    assert snapshot(root) == changed
    assert rollback(ApplyOptions(root, run), force=True) == "000001"
    after = snapshot(root)
    assert rollback(ApplyOptions(root, run)) is None  # the journal is out of the way
    if change == "deleted":  # nothing of the user's to keep: the old one comes back
        assert after == before
        return
    if change == "holds new entries":  # kept, with the user's entry; ours removed
        assert sorted(os.listdir(root / "opt")) == ["mine"]
    else:
        assert after[where[1:]] == changed[where[1:]]  # the change is kept
    untouched = {"etc/os-release", "etc/added"} - {where[1:]}
    for path in untouched:
        assert after.get(path) == before.get(path)
    apply(top, root, run, [f("etc/hello")])  # and the root is usable


def test_rollback_cli_lists_changes_and_force(live: tuple[Path, Path, Path, Path]) -> None:
    top, root, run, _ = live
    _apply_some(top, root, run)
    for name in ("etc/added", "etc/os-release", "opt/x", "opt/y"):
        (root / name).write_bytes(b"edited\n")
    line = _one_error(_cli_rollback(root, run))
    assert line.startswith("error: rollback of transaction 000001 refused: 4 entries changed")
    assert line.endswith("and 1 more")
    forced = dmoverlay("rollback", "--root", str(root), "--run-dir", str(run), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "rolled back transaction 000001" in forced.stdout
    warnings = [line for line in forced.stderr.splitlines() if line.startswith("warning: ")]
    assert any("000001.failed" in line for line in warnings), forced.stderr
    assert (root / "etc/added").read_bytes() == b"edited\n"
    assert (root / "etc/keep.d/a.conf").exists()


def test_a_record_of_the_run_without_run_dir_is_one_error(
        live: tuple[Path, Path, Path, Path]) -> None:
    top, root, run, _ = live
    apply(top, root, run, [f("run/flag", b"on\n")])
    before = snapshot(top)
    with pytest.raises(JournalError, match="not given with --run-dir"):
        rollback(ApplyOptions(root, None))
    assert snapshot(top) == before


def test_records_are_checked_before_anything_is_undone(
        live: tuple[Path, Path, Path, Path]) -> None:
    """A good record, then a bad one: the good one is not undone either."""
    top, root, run, _ = live
    apply(top, root, run, [f("etc/os-release", b"ID=new\n")])
    log = root / TXN / "log"
    lines = log.read_text().splitlines()
    lines.insert(-1, Record("remove", 99, "root", "../x").to_json())
    log.write_text("".join(f"{line}\n" for line in lines))
    before = snapshot(top)
    with pytest.raises(JournalError):
        rollback(ApplyOptions(root, run))
    assert snapshot(top) == before


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.__name__.strip("_"))
def test_a_journal_that_came_with_the_root_cannot_touch_the_live_run(
        live: tuple[Path, Path, Path, Path], job: Callable[[Path, Path, Path], None]) -> None:
    """An image may carry a journal; the live /run is not the image's.  A
    planted record naming the run tree (with the inode of a file there, and an
    empty directory) had the recovery delete both without a word."""
    top, root, run, _ = live
    (run / "victim").write_bytes(b"live state\n")
    (run / "emptydir").mkdir()
    ino = os.lstat(run / "victim").st_ino
    plant(root, [{"step": "begin", "time_ns": 0},
                 {"step": "mkdir", "n": 1, "tree": "run", "path": "emptydir"},
                 {"step": "put", "n": 2, "tree": "run", "path": "victim",
                  "tmp": ".dmoverlay-000001-2"},
                 {"step": "ready", "n": 2, "ino": ino}])
    with pytest.raises(JournalError, match="where this transaction has no journal"):
        job(root, run, top)
    assert (run / "victim").read_bytes() == b"live state\n"
    assert (run / "emptydir").is_dir()


def test_a_path_that_is_no_file_name_is_one_error_line(
        live: tuple[Path, Path, Path, Path]) -> None:
    _, root, run, _ = live
    plant(root, ['{"step":"begin","time_ns":0}',
                 '{"step":"mkdir","n":1,"tree":"root","path":"a\\ud800/b"}'])
    with pytest.raises(JournalError, match="not a file name"):
        rollback(ApplyOptions(root, run))
