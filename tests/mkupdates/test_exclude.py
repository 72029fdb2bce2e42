"""`mkupdates --exclude`: what a pattern names is left as the target has it.
On generated trees: applied onto OLD, the update makes NEW everywhere but
under the excluded names, where OLD stays, or mkupdates refuses it."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dmoverlay.apply.update import ApplyOptions, apply_update
from dmoverlay.core.errors import UsageError
from dmoverlay.mkupdates.exclude import Excluded, parse
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.make import MkupdatesOptions, make_updates
from tests.mkupdates.test_roundtrip import GROUP_FILES, pairs
from tests.mkupdates.treekit import Node, Seen, Spec, build, snapshot

DIR = Node("dir", 0o755)
LOG = Node("file", 0o640, 0, b"log\n")


@pytest.mark.parametrize(("pattern", "name", "left_out"), [
    ("var/log", "var/log", True),
    ("var/log", "var/log/syslog", True),  # with all it holds
    ("var/log", "var/logs", False),
    ("var/log", "srv/var/log", False),  # a "/": from the top
    ("/var/log/", "var/log/x", True),
    ("/var/cache/*", "var/cache", False),
    ("/var/cache/*", "var/cache/apt/pkg", True),
    ("*.pyc", "usr/lib/x.pyc", True),  # no "/": at any depth
    ("*.pyc", "x.pyc/inside", True),
    ("*.pyc", "usr/lib/x.py", False),
    ("machine-id", "etc/machine-id", True),
    ("/machine-id", "etc/machine-id", False),
    ("var/*/x", "var/a/b/x", False),  # * stays within a name
    ("[ab]", "c/b", True),
])
def test_what_a_pattern_leaves_out(pattern: str, name: str, left_out: bool) -> None:
    assert (Excluded([parse(pattern)]).by(name) is not None) is left_out


def test_a_name_deeper_than_python_recurses_is_judged() -> None:
    """An archive's names come children first where parents are implied."""
    deep = "/".join(["d"] * 5000)
    excluded = Excluded([parse("x")])
    assert excluded.by(deep + "/f") is None
    assert excluded.by(deep + "/x/f") is not None and excluded.by("d/x") is not None


@pytest.mark.parametrize("pattern", ["", "/", "a//b", "../x", "a/./b", "**/x", "a\nb"])
def test_a_pattern_that_names_nothing_is_refused(pattern: str) -> None:
    with pytest.raises(UsageError, match="--exclude"):
        parse(pattern)


def _make(top: Path, old: Spec, new: Spec, *patterns: str) -> Path:
    build(top / "old", old)
    build(top / "new", new)
    out = top / "u.img"
    make_updates(MkupdatesOptions(new=str(top / "new"), old=str(top / "old"), output=out,
                                  format=Format.TAR_ZST, exclude=patterns))
    return out


def _applied(top: Path, update: Path) -> Path:
    (top / "run").mkdir()
    apply_update(str(update), ApplyOptions(root=top / "old", run_dir=top / "run"))
    return top / "old"


OLD = {"etc": DIR, "etc/app.conf": Node("file", 0o644, 0, b"x=1\n"),
       "etc/machine-id": Node("file", 0o444, 0, b"1111\n"),
       "var": DIR, "var/log": DIR, "var/log/old.log": LOG, "var/log/kept.log": LOG}
NEW = {"etc": DIR, "etc/app.conf": Node("file", 0o644, 0, b"x=2\n"),
       "etc/machine-id": Node("file", 0o444, 0, b"2222\n"),
       "var": DIR, "var/log": replace(DIR, mode=0o750),
       "var/log/kept.log": replace(LOG, data=b"log\nmore\n"), "var/log/new.log": LOG}


def test_excluded_names_stay_as_the_target_has_them(tmp_path: Path) -> None:
    """The live system's churn left out: its log directory (mode changed,
    a file written, one new, one removed) and its machine-id; the fix goes."""
    build(tmp_path / "want", {"etc": DIR, "etc/app.conf": NEW["etc/app.conf"],
                              "etc/machine-id": OLD["etc/machine-id"], "var": DIR,
                              "var/log": OLD["var/log"], "var/log/old.log": LOG,
                              "var/log/kept.log": LOG})
    update = _make(tmp_path, OLD, NEW, "var/log", "machine-id")
    listing = make_updates(MkupdatesOptions(
        new=str(tmp_path / "new"), old=str(tmp_path / "old"), output=None,
        format=Format.TAR_ZST, exclude=("var/log", "machine-id"))).listing()
    assert listing == [("file", "etc/app.conf")]
    assert snapshot(_applied(tmp_path, update)) == snapshot(tmp_path / "want")


@pytest.mark.parametrize(("new", "says"), [
    ({**NEW, "var": replace(DIR, mode=0o700)}, "the update makes var again (its type, mode"),
    ({k: v for k, v in NEW.items() if not k.startswith("var")}, "the update removes var"),
    ({**{k: v for k, v in NEW.items() if not k.startswith("var")},
      "var": Node("link", 0o777, 0, b"srv")}, "the update makes var again"),
])
def test_an_exclusion_the_update_would_break_is_refused(tmp_path: Path, new: Spec,
                                                        says: str) -> None:
    """A directory above it made again, or removed, takes it along: refused,
    and nothing written."""
    with pytest.raises(UsageError, match="--exclude var/log: var/log.* would be removed "
                                         f"all the same: {re.escape(says)}") as caught:
        _make(tmp_path, OLD, new, "var/log")
    assert "exclude var too" in (caught.value.hint or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


def test_a_hard_link_of_a_file_written_is_split(tmp_path: Path) -> None:
    """NEW writes both names of an inode; one is excluded: it keeps the
    target's content, the other takes NEW's, so they are no longer one."""
    g = GROUP_FILES[1]
    old = {"a": g, "b": g}
    new = {"a": replace(g, data=b"2\n"), "b": replace(g, data=b"2\n")}
    update = _make(tmp_path, old, new, "b")
    before = (tmp_path / "old" / "b").stat().st_ino
    _, groups = snapshot(_applied(tmp_path, update))
    assert (tmp_path / "old" / "a").read_bytes() == b"2\n"
    assert (tmp_path / "old" / "b").read_bytes() == b"1\n"
    assert (tmp_path / "old" / "b").stat().st_ino == before
    assert groups == {frozenset({"a"}), frozenset({"b"})}


def test_the_command_line_takes_each_pattern(tmp_path: Path) -> None:
    build(tmp_path / "old", OLD)
    build(tmp_path / "new", NEW)
    result = subprocess.run([sys.executable, "-m", "dmoverlay", "mkupdates", "--from",
                             str(tmp_path / "old"), "--to", str(tmp_path / "new"),
                             "--exclude", "/var/log/", "--exclude", "machine-id", "--dry-run"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["file\tetc/app.conf"]


def test_a_bad_pattern_is_one_error_line_before_anything_is_read(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dmoverlay", "mkupdates", "--from",
                             str(tmp_path / "absent"), "--to", str(tmp_path / "absent"),
                             "--exclude", "../etc", "-o", str(tmp_path / "u.img")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: --exclude '../etc': not a path in the tree"
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


@st.composite
def pairs_and_a_name(draw: st.DrawFn) -> tuple[Spec, Spec, str]:
    old, new = draw(pairs(with_xattrs=True))
    return old, new, draw(st.sampled_from(sorted({*old, *new}) or ["a"]))


def _under(name: str, top: str) -> bool:
    return name == top or name.startswith(top + "/")


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@example((OLD, NEW, "var/log"))
@given(pairs_and_a_name())
def test_applied_onto_old_it_makes_new_but_where_excluded(case: tuple[Spec, Spec, str]) -> None:
    """Excluding any one name of OLD or NEW (anchored): refused, or NEW
    outside it and OLD inside it, entry by entry, links included."""
    old, new, name = case
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        try:
            update = _make(top, old, new, "/" + name)
        except UsageError as exc:
            assert "would be removed all the same" in exc.message, exc.message
            return
        was, _ = snapshot(top / "old")
        want, want_groups = snapshot(top / "new")
        got, got_groups = snapshot(_applied(top, update))

    def part(seen: dict[str, Seen], inside: bool) -> dict[str, Seen]:
        return {k: v for k, v in seen.items() if _under(k, name) is inside}

    def outside(groups: set[frozenset[str]]) -> set[frozenset[str]]:
        return {g for g in (frozenset(n for n in grp if not _under(n, name))
                            for grp in groups) if g}
    assert part(got, False) == part(want, False)
    assert part(got, True) == part(was, True)
    assert outside(got_groups) == outside(want_groups)
