"""`dmoverlay mkupdates` from the command line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from dmoverlay.overlay.state import Step, StepKind
from tests.apply.test_cli import error_line
from tests.conftest import dmoverlay
from tests.mkupdates.treekit import Node, build
from tests.overlay.statefiles import make_state, plant


def test_dry_run_lists_kind_and_path_and_writes_nothing(tmp_path: Path) -> None:
    build(tmp_path / "old", {"etc": Node("dir"), "etc/a": Node("file"),
                             "etc/gone": Node("file")})
    build(tmp_path / "new", {"etc": Node("dir"), "etc/a": Node("file", data=b"2"),
                             "etc/b": Node("link", data=b"a")})
    result = dmoverlay("-q", "mkupdates", "--from", str(tmp_path / "old"),
                       "--to", str(tmp_path / "new"), "-o", str(tmp_path / "u.img"),
                       "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["file\tetc/a", "symlink\tetc/b", "whiteout\tetc/gone"]
    assert not (tmp_path / "u.img").exists()


def test_writes_the_image_and_the_same_again(tmp_path: Path) -> None:
    build(tmp_path / "tree", {"a": Node("file")})
    for n in (1, 2):
        result = dmoverlay("mkupdates", str(tmp_path / "tree"), "-o", str(tmp_path / f"u{n}"),
                           "--format", "tar.zst", "--all-root",
                           env={"SOURCE_DATE_EPOCH": "1000"})
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "u1").read_bytes() == (tmp_path / "u2").read_bytes()


def test_a_refusal_is_one_error_line_and_listed_in_a_dry_run(tmp_path: Path) -> None:
    build(tmp_path / "tree", {"a": Node("file", 0o2755), "b": Node("file", 0o4755)})
    result = dmoverlay("mkupdates", str(tmp_path / "tree"), "-o", str(tmp_path / "u.img"))
    assert error_line(result) == ("error: refused: a: a setuid/setgid file "
                                  "(and 1 more: see --dry-run)")
    assert "hint: pass --allow-setuid if it is meant to be" in result.stderr
    listed = dmoverlay("mkupdates", str(tmp_path / "tree"), "--dry-run")
    assert listed.stdout.splitlines() == ["refuse\ta: a setuid/setgid file",
                                          "refuse\tb: a setuid/setgid file"]


def test_usage_mistakes(tmp_path: Path) -> None:
    for args, want in ((["x", "--to", "y", "--from", "z"], "give TREE, or --to NEW"),
                       (["--to", "y"], "--to needs --from"),
                       (["x"], "give -o OUTPUT")):
        assert want in error_line(dmoverlay("mkupdates", *args))


def test_a_missing_tree_is_one_line(tmp_path: Path) -> None:
    result = dmoverlay("mkupdates", str(tmp_path / "nothing"), "-o", str(tmp_path / "u"))
    assert "cannot read" in error_line(result)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_json_lists_the_members(tmp_path: Path) -> None:
    build(tmp_path / "tree", {"a": Node("dir"), "a/b": Node("file")})
    result = dmoverlay("-q", "mkupdates", str(tmp_path / "tree"), "--dry-run", "--json")
    assert json.loads(result.stdout) == {"output": None, "members": [
        {"kind": "dir", "path": "a"}, {"kind": "file", "path": "a/b"}]}


def test_from_live_takes_no_other_side(tmp_path: Path) -> None:
    for args, want in ((["x", "--from-live", "live"], "--from-live takes no TREE, --from or --to"),
                       (["--from", "x", "--from-live", "live"], "--from-live takes no TREE"),
                       (["--to", "x", "--from-live", "live"], "--from-live takes no TREE"),
                       (["x", "--state-dir", "s"], "--state-dir goes with --from-live"),
                       (["--from-live", "live"], "give -o OUTPUT")):
        assert want in error_line(dmoverlay("mkupdates", *args))


@pytest.mark.root
def test_from_live_without_such_an_overlay_is_one_line(tmp_path: Path) -> None:
    result = dmoverlay("mkupdates", "--from-live", "nolive", "--state-dir",
                       str(tmp_path / "state"), "-o", str(tmp_path / "u.img"))
    assert error_line(result) == "error: no overlay named 'nolive' is set up"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.root
@pytest.mark.parametrize("text, want", [
    ("{not json", "unreadable state"),
    (json.dumps({**asdict(make_state(Path("/x"), name="nolive")),
                 "steps": [{"kind": "mount", "what": "/etc"}]}), "a mount step setup would not"),
    (json.dumps(asdict(make_state(Path("/x"), Step(StepKind.DM, "nolive-base"),
                                  Step(StepKind.DM, "nolive-rw"), name="nolive"))),
     "/dev/mapper/nolive-base: no such device"),
])
def test_from_live_with_a_state_not_to_trust_is_one_line(tmp_path: Path, text: str,
                                                         want: str) -> None:
    """A state file is input: checked (load_state), and the devices it
    names judged by what they are; nothing is mounted or left."""
    state = tmp_path / "state"
    plant(state, text, name="nolive")
    result = dmoverlay("mkupdates", "--from-live", "nolive", "--state-dir", str(state),
                       "-o", str(tmp_path / "u.img"))
    assert want in error_line(result)
    assert sorted(p.name for p in state.iterdir()) == ["nolive.json"]
    assert not (tmp_path / "u.img").exists()
