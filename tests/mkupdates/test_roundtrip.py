"""The promise of `mkupdates --from OLD --to NEW`: applied onto OLD, the
update makes NEW, entry by entry (type, mode, owner, content, link target,
xattrs, hardlink groups), on generated trees."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dmoverlay.apply.update import ApplyOptions, ApplyRefused, apply_update
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.make import MkupdatesOptions, make_updates
from tests.mkupdates.treekit import Node, Spec, build, snapshot

# few names, so that OLD and NEW meet often; "-d" sorts before ".wh."
NAMES = ["a", "b", "c", "-d"]
LINK_TARGETS = ["a", "b/c", "../a", "missing", "/a"]

modes = st.sampled_from([0o644, 0o600, 0o755])
owners = st.sampled_from([0, 1000])
# the names of a hardlink group share one inode: their nodes are alike
GROUP_FILES = {1: Node("file", 0o644, 0, b"1\n", (), 1),
               2: Node("file", 0o600, 1000, b"1\n", (), 2)}
xattrs = st.sampled_from([(), (("user.x", b"1"),), (("user.x", b"2"), ("user.y", b""))])


@st.composite
def nodes(draw: st.DrawFn, *, dir_ok: bool, with_xattrs: bool) -> Node:
    kind = draw(st.sampled_from(["dir", "file", "file", "link"] if dir_ok else
                                ["file", "file", "link"]))
    xa = draw(xattrs) if with_xattrs and kind != "link" else ()
    if kind == "dir":
        return Node("dir", draw(st.sampled_from([0o755, 0o700])), draw(owners), xattrs=xa)
    if kind == "link":
        return Node("link", 0o777, draw(owners), draw(st.sampled_from(LINK_TARGETS)).encode())
    group = draw(st.sampled_from([0, 0, 1, 2]))
    if group:
        return GROUP_FILES[group]
    return Node("file", draw(modes), draw(owners), draw(st.sampled_from([b"", b"1\n", b"2\n"])),
                xa)


@st.composite
def trees(draw: st.DrawFn, *, with_xattrs: bool) -> Spec:
    spec: Spec = {}

    def fill(parent: str, depth: int) -> None:
        for name in draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True)):
            path = f"{parent}/{name}" if parent else name
            node = draw(nodes(dir_ok=depth < 2, with_xattrs=with_xattrs))
            spec[path] = node
            if node.kind == "dir":
                fill(path, depth + 1)

    fill("", 0)
    return spec


@st.composite
def changed(draw: st.DrawFn, old: Spec, *, with_xattrs: bool) -> Spec:
    """NEW as OLD with some entries kept, some tweaked (one field), some
    removed or replaced by another kind, and some added: independent trees
    would rarely share an entry to compare."""
    new: Spec = {}
    for path, node in old.items():
        parent = path.rpartition("/")[0]
        if parent and (parent not in new or new[parent].kind != "dir"):
            continue  # its directory went, or became something else
        what = draw(st.sampled_from(["keep", "keep", "keep", "tweak", "tweak", "drop",
                                     "replace"]))
        if what == "tweak":
            new[path] = draw(tweaked(node, with_xattrs=with_xattrs))
        elif what == "replace":
            new[path] = draw(nodes(dir_ok=path.count("/") < 2, with_xattrs=with_xattrs))
        elif what == "keep":
            new[path] = node
    added = draw(trees(with_xattrs=with_xattrs))
    for path, node in added.items():
        parent = path.rpartition("/")[0]
        if path not in new and (not parent or (parent in new and new[parent].kind == "dir")):
            new[path] = node
    return dict(sorted(new.items(), key=lambda item: item[0].split("/")))


@st.composite
def tweaked(draw: st.DrawFn, node: Node, *, with_xattrs: bool) -> Node:
    fields = {"dir": ["mode", "uid", "xattrs"], "link": ["uid", "data"],
              "file": ["mode", "uid", "xattrs", "data", "group"]}[node.kind]
    if not with_xattrs and "xattrs" in fields:
        fields.remove("xattrs")
    field = draw(st.sampled_from(fields))
    if field == "group":  # into a group, or out of one as a file alike in all else
        group = draw(st.sampled_from([0, 1, 2]))
        return GROUP_FILES[group] if group else replace(node, group=0)
    if field == "data":
        return replace(node, data=draw(st.sampled_from(
            [b"a", b"b/c", b"x", b"3\n"] if node.kind == "link" else [b"", b"1\n", b"3\n"])))
    if field == "xattrs":
        return replace(node, xattrs=draw(xattrs))
    if field == "uid":
        return replace(node, uid=draw(owners))
    return replace(node, mode=draw(st.sampled_from([0o755, 0o700, 0o644, 0o600])))


@st.composite
def pairs(draw: st.DrawFn, *, with_xattrs: bool) -> tuple[Spec, Spec]:
    old = draw(trees(with_xattrs=with_xattrs))
    return old, draw(changed(old, with_xattrs=with_xattrs))


def _roundtrip(old: Spec, new: Spec, fmt: Format) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        build(top / "old", old)
        build(top / "new", new)
        (top / "run").mkdir()
        out = top / f"u.{fmt}"
        try:
            make_updates(MkupdatesOptions(new=str(top / "new"), old=str(top / "old"),
                                          output=out, format=fmt))
        except ApplyRefused as exc:  # only squashfs's name order, as its test says
            assert fmt is Format.SQUASHFS, exc
            assert "which the update itself creates" in exc.message
            assume(False)
        apply_update(str(out), ApplyOptions(root=top / "old", run_dir=top / "run"))
        assert snapshot(top / "old") == snapshot(top / "new")


G1, G2 = GROUP_FILES[1], GROUP_FILES[2]
DIR = Node("dir", 0o755)
# what random trees meet too seldom: a group split into files alike in all
# else, files alike joined into a group, a group written in part because a
# directory holding one of its names is made again
SPLIT = ({"a": G1, "b": G1}, {"a": G1, "b": replace(G1, group=0)})
JOIN = ({"a": replace(G1, group=0), "b": replace(G1, group=0)}, {"a": G1, "b": G1})
PART = ({"d": DIR, "d/a": G1, "b": G1}, {"d": replace(DIR, mode=0o700), "d/a": G1, "b": G1})
TYPES = ({"a": DIR, "a/b": G1, "c": Node("link", 0o777, data=b"a"), "-d": DIR, "-d/x": G2},
         {"a": Node("link", 0o777, data=b"c"), "c": DIR, "c/b": G1, "-d": G2})


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@example(SPLIT)
@example(JOIN)
@example(PART)
@example(TYPES)
@given(pairs(with_xattrs=True))
def test_applied_onto_old_the_update_makes_new(trees: tuple[Spec, Spec]) -> None:
    _roundtrip(*trees, Format.TAR_ZST)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@example(SPLIT)
@example(PART)
@example(TYPES)
@given(pairs(with_xattrs=False))
def test_in_anacondas_cpio_too(trees: tuple[Spec, Spec]) -> None:
    _roundtrip(*trees, Format.CPIO)


@pytest.mark.root
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@example(SPLIT)
@example(PART)
@given(pairs(with_xattrs=True))
def test_in_squashfs_too(trees: tuple[Spec, Spec]) -> None:
    """Mounted by apply: what mkupdates lets through, apply takes."""
    _roundtrip(*trees, Format.SQUASHFS)
