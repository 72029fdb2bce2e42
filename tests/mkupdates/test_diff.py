"""The difference, decided without a disk: listings in, changes out."""

from __future__ import annotations

from dmoverlay.core.entries import Kind, Member
from dmoverlay.mkupdates.diff import Change, difference, members, normalized
from dmoverlay.mkupdates.listing import Entry


def f(name: str, data: bytes = b"1", mode: int = 0o644, group: str = "", **kw: object) -> Entry:
    return Entry(Member(name, Kind.FILE, mode, size=len(data), **kw),  # type: ignore[arg-type]
                 data, group or name)


def d(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(Member(name, Kind.DIR, mode, **kw))  # type: ignore[arg-type]


def link(name: str, target: str) -> Entry:
    return Entry(Member(name, Kind.SYMLINK, 0o777, target=target))


def side(*entries: Entry) -> dict[str, Entry]:
    return {e.name: e for e in entries}


def ops(changes: list[Change]) -> list[tuple[str, str]]:
    return [(str(c.op), c.name) for c in changes]


def test_a_tree_alone_is_all_puts_parents_first() -> None:
    new = side(f("b/x"), d("b"), f("a"), link("b/l", "x"))
    assert ops(difference({}, new)) == [("put", "a"), ("put", "b"), ("put", "b/l"),
                                        ("put", "b/x")]


def test_the_same_tree_gives_nothing() -> None:
    tree = side(d("a"), f("a/x"), link("l", "a"))
    assert difference(tree, dict(tree)) == []


def test_only_what_changed() -> None:
    old = side(d("a"), f("a/same"), f("a/data", b"1"), f("a/mode"), f("a/owner"),
               f("a/xattr"), link("a/l", "x"))
    new = side(d("a"), f("a/same"), f("a/data", b"2"), f("a/mode", mode=0o600),
               f("a/owner", uid=5), f("a/xattr", xattrs=(("user.a", b"1"),)),
               link("a/l", "y"))
    assert ops(difference(old, new)) == [("put", f"a/{n}") for n in
                                         ("data", "l", "mode", "owner", "xattr")]


def test_times_alone_are_no_change() -> None:
    assert difference(side(f("a", mtime_ns=1)), side(f("a", mtime_ns=2))) == []


def test_removed_entries_are_whited_out_once_at_the_top_of_what_goes() -> None:
    old = side(d("a"), d("a/b"), f("a/b/x"), f("a/y"), f("z"))
    new = side(d("a"))
    assert ops(difference(old, new)) == [("whiteout", "a/b"), ("whiteout", "a/y"),
                                         ("whiteout", "z")]


def test_a_type_change_to_or_from_a_directory_whites_out_first() -> None:
    old = side(d("a"), f("a/x"), link("b", "a"), f("c"))
    new = side(f("a"), d("b"), f("b/y"), link("c", "a"))
    assert ops(difference(old, new)) == [("whiteout", "a"), ("put", "a"), ("whiteout", "b"),
                                         ("put", "b"), ("put", "b/y"), ("put", "c")]


def test_a_directory_whose_metadata_changed_is_made_again_with_all_it_holds() -> None:
    """apply keeps an existing directory's metadata: the only way to change
    it is to make the directory anew."""
    old = side(d("a"), f("a/x"), f("a/gone"))
    new = side(d("a", mode=0o700), f("a/x"))
    assert ops(difference(old, new)) == [("whiteout", "a"), ("put", "a"), ("put", "a/x")]


def test_a_hardlink_group_is_written_whole() -> None:
    old = side(f("a", group="a"), f("b", group="a"))
    new = side(f("a", b"2", group="a"), f("b", b"2", group="a"), f("c", b"2", group="a"))
    changes = difference(old, new)
    assert ops(changes) == [("put", "a"), ("put", "b"), ("put", "c")]
    written = members(changes, new, epoch=None)
    assert [(m.kind, m.target) for m in written] == [
        (Kind.FILE, ""), (Kind.HARDLINK, "a"), (Kind.HARDLINK, "a")]


def test_a_group_split_or_joined_is_a_change() -> None:
    linked = side(f("a", group="a"), f("b", group="a"))
    apart = side(f("a"), f("b"))
    assert ops(difference(linked, apart)) == [("put", "a"), ("put", "b")]
    assert ops(difference(apart, linked)) == [("put", "a"), ("put", "b")]


def test_a_name_removed_from_a_group_leaves_the_rest_alone() -> None:
    old = side(f("a", group="a"), f("b", group="a"), f("c", group="a"))
    new = side(f("a", group="a"), f("b", group="a"))
    assert ops(difference(old, new)) == [("whiteout", "c")]


def test_directories_an_archive_leaves_out_are_implied() -> None:
    assert ops(difference(side(f("a/x")), side(f("a/x"), f("a/y")))) == [("put", "a/y")]


def test_whiteout_members_and_clamped_times() -> None:
    old = side(f("a"), f("b"))
    new = side(f("b", b"2", mtime_ns=5 * 10**9))
    written = members(difference(old, new), new, epoch=3)
    assert [(m.name, m.kind, m.size, m.mtime_ns) for m in written] == [
        (".wh.a", Kind.FILE, 0, 3 * 10**9), ("b", Kind.FILE, 1, 3 * 10**9)]
    assert members(difference({}, new), new, epoch=None)[0].mtime_ns == 5 * 10**9


def test_all_root_and_no_xattrs_apply_to_both_sides_before_comparing() -> None:
    old = side(f("a", uid=5, xattrs=(("user.a", b"1"),)))
    new = side(f("a", uid=6))
    assert difference(old, new) != []
    assert difference(normalized(old, all_root=True, no_xattrs=True),
                      normalized(new, all_root=True, no_xattrs=True)) == []
