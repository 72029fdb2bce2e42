"""Hostile updates and roots for the planner: places judged where they
resolve (not as their names are written), mount points inside the root,
privilege carried in metadata, and a root that changes while it is planned."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.apply.execute import ApplyRefused
from dmoverlay.apply.inroot import Trees
from dmoverlay.apply.plan import Op, Options, Planner, Where, make_plan
from dmoverlay.core.entries import Kind, Member
from tests.applykit import apply, d, f, hard, link, make_root, other, snapshot
from tests.conftest import dmoverlay, small_tmpfs


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, run = make_root(tmp_path / "live")
    return tmp_path, root, run


def with_xattrs(member: tuple[Member, bytes], *xattrs: tuple[str, bytes]) -> tuple[Member, bytes]:
    m, data = member
    return Member(m.name, m.kind, m.mode, m.uid, m.gid, m.mtime_ns, m.size, m.target,
                  xattrs=xattrs), data


# ------------------------------------------------------------------ reserved places

def _links(root: Path, run: Path) -> None:
    """Ways back to the top of each tree, as a root may hold them."""
    os.symlink("../..", root / "usr/lib/top")
    os.symlink("/run", root / "var/run")
    os.symlink("../run", root / "var/run2")
    os.symlink("run", root / "toprun")
    os.symlink(".dmoverlay-000001-0", root / "usr/tmpname")
    os.symlink("/.DMOVERLAY", root / "usr/lib/shout")
    os.symlink("..", run / "up")


THROUGH_LINKS = [
    ("journal-via-top", [f("usr/lib/top/.dmoverlay/journal/000001/log")], "keeps for its"),
    ("journal-dir-via-top", [d("usr/lib/top/.dmoverlay")], "keeps for its"),
    ("run-journal", [f("run/.dmoverlay/journal/000001/log")], "keeps for its"),
    ("run-journal-via-abs-link", [f("var/run/.dmoverlay/x")], "keeps for its"),
    ("run-journal-via-rel-link", [f("var/run2/.dmoverlay/x")], "keeps for its"),
    ("run-journal-via-top-link", [f("toprun/.dmoverlay/x")], "keeps for its"),
    ("root-journal-via-run", [f("run/up/.dmoverlay/x")], "keeps for its"),
    ("journal-other-case", [f("usr/lib/top/.DMOVERLAY/x")], "keeps for its"),
    ("journal-via-link-other-case", [f("usr/lib/shout/x")], "keeps for its"),
    ("temporary-name-via-link", [f("usr/tmpname/x")], "keeps for its"),
    ("whiteout-journal", [other(".wh..dmoverlay", Kind.FILE)], "keeps for its"),
    ("whiteout-temporary", [other("usr/.wh..dmoverlay-000001-0", Kind.FILE)], "keeps for its"),
    ("whiteout-journal-via-top", [other("usr/lib/top/.wh..dmoverlay", Kind.FILE)],
     "keeps for its"),
    ("staging", [f("run/dmoverlay/staging-x/y")], "staging"),
    ("whiteout-staging", [other("var/run/.wh.dmoverlay", Kind.FILE)], "staging"),
    ("proc-file-via-top", [f("usr/lib/top/proc")], "/proc"),
    ("proc-link-via-top", [link("usr/lib/top/proc", "/x")], "/proc"),
    ("proc-dir-via-top", [d("usr/lib/top/proc")], "/proc"),
    ("proc-below-via-top", [f("usr/lib/top/proc/sys/x")], "/proc"),
    ("whiteout-proc-via-top", [other("usr/lib/top/.wh.proc", Kind.FILE)], "/proc"),
    ("whiteout-tmp-via-top", [other("usr/lib/top/.wh.tmp", Kind.FILE)], "/tmp"),
    ("hardlink-to-sys-via-top", [hard("usr/lib/top/sys", "usr/fine")], "sysfs"),
    ("dev-via-run", [f("run/up/dev/x")], "devtmpfs"),
    ("run-replaced-via-top", [link("usr/lib/top/run", "/var/run")], "/run"),
    ("run-replaced", [f("run")], "/run"),
    ("run-whiteout", [other(".wh.run", Kind.FILE)], "/run"),
]


@pytest.mark.parametrize(("case", "entries", "words"), THROUGH_LINKS,
                         ids=[c[0] for c in THROUGH_LINKS])
def test_reserved_places_are_judged_where_they_resolve(
        live: tuple[Path, Path, Path], case: str, entries: list[tuple[Member, bytes]],
        words: str) -> None:
    top, root, run = live
    _links(root, run)
    apply(top, root, run, [f("etc/first")])  # a journal at the top of ROOT now
    (run / "dmoverlay/staging-x").mkdir(parents=True)
    before = snapshot(top)
    with pytest.raises(ApplyRefused) as caught:
        apply(top, root, run, [f("usr/fine"), *entries])
    assert words in caught.value.message, caught.value.message
    assert snapshot(top) == before


def test_the_run_link_at_the_top_leads_to_the_live_run(live: tuple[Path, Path, Path]) -> None:
    """/toprun -> run is /run on the live system: the live /run, not ROOT/run
    under it; and /run/up -> .. leads back to the root."""
    top, root, run = live
    _links(root, run)
    apply(top, root, run, [f("toprun/a", b"a\n"), f("run/up/etc/b", b"b\n")])
    assert (run / "a").read_bytes() == b"a\n"
    assert not (root / "run/a").exists()
    assert (root / "etc/b").read_bytes() == b"b\n"


def test_a_run_directory_entry_is_still_accepted(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    result = apply(top, root, run, [d("run"), f("run/x")])
    assert (run / "x").exists()
    assert [a.op for a in result.plan.actions] == [Op.CREATE]


LINK_TARGETS = ["../..", "..", "/", "/run", "../run", "run", ".", "/.dmoverlay", "proc"]
COMPONENTS = ["a", "top", "up", "run", "proc", "tmp", ".dmoverlay", ".DMOVERLAY",
              ".wh.proc", ".wh..dmoverlay", ".wh.run", "dmoverlay"]


@given(st.lists(st.tuples(st.sampled_from(["usr/top", "usr/lib/up", "up"]),
                          st.sampled_from(LINK_TARGETS)), max_size=3, unique_by=lambda t: t[0]),
       st.lists(st.tuples(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4),
                          st.sampled_from([Kind.FILE, Kind.DIR, Kind.SYMLINK])), max_size=6))
def test_no_plan_ever_touches_a_reserved_place(
        tmp_path_factory: pytest.TempPathFactory, links: list[tuple[str, str]],
        members: list[tuple[list[str], Kind]]) -> None:
    """Whatever links the root holds and however the names are spelt, no
    action lands on the journal, /proc, /tmp, the staging directory or
    replaces /run."""
    top = tmp_path_factory.mktemp("reserved")
    root, run = make_root(top)
    for where, target in links:
        os.symlink(target, root / where)
    os.symlink("..", run / "up")
    with Trees(os.fspath(root), os.fspath(run)) as trees:
        plan = make_plan(trees, [Member("/".join(parts), kind, target="x")
                                 for parts, kind in members], Options())
    for a in plan.actions:
        first = a.where.path.split("/")[0].casefold()
        assert first not in (".dmoverlay", "")
        assert not any(p.startswith(".dmoverlay-") for p in a.where.path.split("/"))
        if a.where.tree == "root":
            assert first not in ("proc", "sys", "dev", "tmp"), a
            assert first != "run" or (a.where.path == "run" and a.op is Op.MKDIR), a
        else:
            assert first != "dmoverlay", a


# ------------------------------------------------------------------ `..` at the top

def test_dotdot_at_the_top_stays_at_the_top(live: tuple[Path, Path, Path]) -> None:
    """As the kernel resolves them: /.. is /, and /run/.. is / too."""
    top, root, run = live
    os.symlink("/../../../usr/lib", root / "lib2")
    os.symlink("../../..", root / "usr/up3")
    os.symlink("../../usr/bin", run / "bin2")
    before_outside = sorted(p.name for p in top.iterdir())
    apply(top, root, run, [f("lib2/a", b"a\n"), f("usr/up3/etc/b", b"b\n"),
                           f("run/bin2/c", b"c\n")])
    assert (root / "usr/lib/a").read_bytes() == b"a\n"
    assert (root / "etc/b").read_bytes() == b"b\n"
    assert (root / "usr/bin/c").read_bytes() == b"c\n"
    assert sorted(p.name for p in top.iterdir()) == before_outside


# ------------------------------------------------------------------ the update's top

@pytest.mark.parametrize("member", [Member("", Kind.SYMLINK, 0o777, target="/etc"),
                                    Member("", Kind.FILE, 0o644),
                                    Member("", Kind.HARDLINK, 0o644, target="usr/fine")],
                         ids=["symlink", "file", "hardlink"])
def test_the_top_of_an_update_must_be_a_directory(live: tuple[Path, Path, Path],
                                                 member: Member) -> None:
    top, root, run = live
    before = snapshot(top)
    with pytest.raises(ApplyRefused, match="top of the update") as caught:
        apply(top, root, run, [f("usr/fine"), (member, b"")])
    assert caught.value.plan.refusals[0].name == "/"
    assert snapshot(top) == before


def test_the_top_of_an_update_as_a_directory_is_fine(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    result = apply(top, root, run, [(Member("", Kind.DIR, 0o700), b""), f("usr/fine")])
    assert [a.op for a in result.plan.actions] == [Op.CREATE]
    assert os.stat(root).st_mode & 0o777 != 0o700


# ------------------------------------------------------------------ whiteouts in bulk

def _planner(root: Path, run: Path, members: list[tuple[Member, bytes]]) -> Planner:
    trees = Trees(os.fspath(root), os.fspath(run))
    planner = Planner(trees, Options())
    for m, _ in members:
        planner.add(m)
    return planner


def test_a_removed_place_and_everything_below_it_are_gone(live: tuple[Path, Path, Path]) -> None:
    _, root, run = live
    (root / "etc/keep.dx").mkdir()
    (root / "etc/keep.dx/b").write_text("b")
    planner = _planner(root, run, [other("etc/.wh.keep.d", Kind.FILE)])
    try:
        kind_at = planner._kind_at
        assert kind_at(Where("root", "etc/keep.d")) == (None, False)
        assert kind_at(Where("root", "etc/keep.d/a.conf")) == (None, False)
        assert kind_at(Where("root", "etc/keep.d/a.conf/deeper")) == (None, False)
        # a name that only begins like the removed one, and the same path in the other tree
        assert kind_at(Where("root", "etc/keep.dx/b")) == (Kind.FILE, False)
        assert kind_at(Where("root", "etc/keep.dx")) == (Kind.DIR, False)
        assert kind_at(Where("root", "etc")) == (Kind.DIR, False)
        assert kind_at(Where("run", "etc/keep.d")) == (None, False)
        assert kind_at(Where("root", "etc/os-release")) == (Kind.FILE, False)
        planner.add(f("etc/keep.d", b"now a file\n")[0])
        assert planner.plan.ok, planner.plan.refusals
        assert kind_at(Where("root", "etc/keep.d")) == (Kind.FILE, True)
    finally:
        planner.tree.close()  # type: ignore[attr-defined]


def test_thousands_of_whiteouts_plan_the_same_as_one_by_one(
        live: tuple[Path, Path, Path]) -> None:
    """Each file lands beside the removed ones and is a creation; every
    removed name is a whiteout (what the ancestor lookup must find)."""
    _, root, run = live
    share = root / "usr/share"
    for i in range(30):
        (share / f"d{i}").mkdir(parents=True)
        for j in range(30):
            (share / f"d{i}/old{j}").write_bytes(b"x")
    members = []
    for i in range(30):
        for j in range(30):
            members += [other(f"usr/share/d{i}/.wh.old{j}", Kind.FILE),
                        f(f"usr/share/d{i}/new{j}")]
    planner = _planner(root, run, members)
    try:
        plan = planner.plan
        assert plan.ok, plan.refusals[:3]
        assert plan.count(Op.WHITEOUT) == 900
        assert plan.count(Op.CREATE) == 900
    finally:
        planner.tree.close()  # type: ignore[attr-defined]


@given(st.sets(st.lists(st.sampled_from("abc"), min_size=1, max_size=4).map("/".join),
               max_size=8),
       st.lists(st.sampled_from("abc"), min_size=1, max_size=5).map("/".join),
       st.sampled_from(["root", "run"]))
def test_the_removed_lookup_matches_a_scan_of_every_whiteout(
        removed: set[str], path: str, tree: str) -> None:
    class Nothing:
        def kind(self, where: Where) -> Kind | None:
            return Kind.DIR

    planner = Planner(Nothing(), Options())  # type: ignore[arg-type]
    planner.removed = {Where("root", r) for r in removed}
    where = Where(tree, path)
    scanned = any(r.tree == where.tree and (r.path == where.path
                                            or where.path.startswith(r.path + "/"))
                  for r in planner.removed)
    assert planner._kind_at(where) == ((None, False) if scanned else (Kind.DIR, False))


def test_a_directory_holding_planned_entries_is_not_empty(live: tuple[Path, Path, Path]) -> None:
    """Whether a directory may be replaced by a file, with what the plan
    made inside it counted, before and after the first such question."""
    _, root, run = live
    for name in ("a", "b", "c", "e", "ex"):
        (root / "srv" / name).mkdir(parents=True)
    planner = _planner(root, run, [
        f("srv/a"),  # an empty directory replaced: the first question
        f("srv/b/new"), f("srv/b"),  # a child planned after it
        f("srv/c/x/y"), f("srv/c"),  # a grandchild, its directory made on the way
        f("srv/ex/f"), f("srv/e"),  # a sibling that only begins the same
    ])
    try:
        refused = {r.name for r in planner.plan.refusals}
        assert refused == {"srv/b", "srv/c"}, planner.plan.refusals
        assert planner._kind_at(Where("root", "srv/e")) == (Kind.FILE, True)
    finally:
        planner.tree.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ mount points inside ROOT

@contextmanager
def bind_mount(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


MOUNTED = [
    ("file-below", [f("boot/vmlinuz")], "/boot"),
    ("dir-below", [d("boot/grub"), f("boot/grub/grub.cfg")], "/boot"),
    ("dir-made-on-the-way", [f("boot/efi/x")], "/boot"),
    ("whiteout-of-the-mount-point", [other(".wh.boot", Kind.FILE)], "/boot"),
    ("whiteout-below", [other("boot/.wh.old", Kind.FILE)], "/boot"),
    ("file-over-the-mount-point", [f("boot")], "/boot"),
    ("through-a-link", [f("usr/lib/top/boot/x")], "/boot"),
    ("bind-mount-of-the-same-filesystem", [f("srv/x")], "/srv"),
    ("run-user", [f("run/user/x")], "<run>/user"),
]


@pytest.mark.root
@pytest.mark.parametrize(("case", "entries", "words"), MOUNTED, ids=[c[0] for c in MOUNTED])
def test_a_mount_point_inside_the_root_is_refused(
        live: tuple[Path, Path, Path], case: str, entries: list[tuple[Member, bytes]],
        words: str) -> None:
    top, root, run = live
    os.symlink("../..", root / "usr/lib/top")
    with small_tmpfs(root / "boot", "size=1m") as boot, bind_mount(root / "srv"), \
            small_tmpfs(run / "user", "size=1m"):
        (boot / "old").write_bytes(b"old")
        before = snapshot(top)
        with pytest.raises(ApplyRefused) as caught:
            apply(top, root, run, [f("usr/fine"), *entries])
        message = caught.value.message
        assert "another filesystem" in message and words in message, message
        assert snapshot(top) == before
        apply(top, root, run, [f("etc/elsewhere"), d("boot"), f("run/fine")])  # all on the tops


# ------------------------------------------------------------------ a root that changes

class Racing(Trees):
    """After the planner learns that `where` is a symlink, it becomes a
    directory (as another process could make it)."""

    where = Where("root", "lib")

    def kind(self, where: Where) -> Kind | None:
        found = super().kind(where)
        if where == self.where:
            path = Path(self.root) / where.path
            path.unlink()
            path.mkdir()
        return found


def test_a_link_that_stops_being_one_while_planning_is_refused(
        live: tuple[Path, Path, Path]) -> None:
    _, root, run = live
    with Racing(os.fspath(root), os.fspath(run)) as trees:
        plan = make_plan(trees, [f("lib/x")[0]], Options())
    assert not plan.ok
    assert "changed while" in plan.refusals[0].reason, plan.refusals


# ------------------------------------------------------------------ privilege in metadata

def capability(version: int = 2, effective: bool = True) -> bytes:
    """A vfs_cap_data: cap_setuid and cap_sys_admin, permitted (and effective)."""
    magic = (version << 24) | int(effective)
    caps = (1 << 7) | (1 << 21)
    body = struct.pack("<II", caps, 0) + struct.pack("<II", 0, 0)
    return struct.pack("<I", magic) + body + (struct.pack("<I", 0) if version == 3 else b"")


def acl(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 1, 2, 4, 8, 0x10, 0x20
NONE = 0xFFFFFFFF
GOOD_ACL = acl((USER_OBJ, 7, NONE), (USER, 5, 1000), (GROUP_OBJ, 5, NONE), (MASK, 5, NONE),
               (OTHER, 0, NONE))
SHORT_ACL = acl((USER_OBJ, 6, NONE), (GROUP_OBJ, 4, NONE), (OTHER, 4, NONE))

XATTRS_REFUSED = [
    ("capability", Kind.FILE, "security.capability", capability(), "--allow-setuid"),
    ("capability-on-a-dir", Kind.DIR, "security.capability", capability(), "--allow-setuid"),
    ("capability-on-a-link", Kind.SYMLINK, "security.capability", capability(),
     "--allow-setuid"),
    ("overlay", Kind.FILE, "trusted.overlay.redirect", b"/etc", "--allow-xattr"),
    ("overlay-opaque-dir", Kind.DIR, "trusted.overlay.opaque", b"y", "--allow-xattr"),
    ("ima", Kind.FILE, "security.ima", b"\x03\x02\x04", "--allow-xattr"),
    ("evm", Kind.FILE, "security.evm", b"\x03\x02\x04", "--allow-xattr"),
    ("smack-exec", Kind.FILE, "security.SMACK64EXEC", b"_", "--allow-xattr"),
    ("system-other", Kind.FILE, "system.nfs4_acl", b"\0" * 8, "--allow-xattr"),
    ("unknown-namespace", Kind.FILE, "os2.name", b"x", ""),
    ("no-namespace", Kind.FILE, "plain", b"x", ""),
    ("empty-suffix", Kind.FILE, "user.", b"x", ""),
    ("nul-in-name", Kind.FILE, "user.a\0b", b"x", ""),
    ("long-name", Kind.FILE, "user." + "n" * 251, b"x", ""),
    ("value-too-big", Kind.FILE, "user.big", bytes(65537), ""),
    ("acl-garbage", Kind.FILE, "system.posix_acl_access", b"garbage", ""),
    ("acl-version", Kind.FILE, "system.posix_acl_access",
     acl((USER_OBJ, 6, NONE), (GROUP_OBJ, 4, NONE), (OTHER, 4, NONE), version=1), ""),
    ("acl-no-mask", Kind.FILE, "system.posix_acl_access",
     acl((USER_OBJ, 7, NONE), (USER, 5, 1000), (GROUP_OBJ, 5, NONE), (OTHER, 0, NONE)), ""),
    ("acl-unknown-tag", Kind.FILE, "system.posix_acl_access",
     acl((USER_OBJ, 7, NONE), (0x40, 5, 1), (GROUP_OBJ, 5, NONE), (OTHER, 0, NONE)), ""),
    ("acl-bad-perm", Kind.FILE, "system.posix_acl_access",
     acl((USER_OBJ, 8, NONE), (GROUP_OBJ, 5, NONE), (OTHER, 0, NONE)), ""),
    ("acl-empty", Kind.FILE, "system.posix_acl_access", acl(), ""),
    ("acl-default-on-a-file", Kind.FILE, "system.posix_acl_default", SHORT_ACL, ""),
    ("selinux-garbage", Kind.FILE, "security.selinux", b"\x01\x02", ""),
    ("capability-garbage", Kind.FILE, "security.capability", b"\x02\x00\x00\x02", ""),
]


def _member(kind: Kind, xattrs: tuple[tuple[str, bytes], ...]) -> tuple[Member, bytes]:
    if kind is Kind.DIR:
        return with_xattrs(d("usr/newdir"), *xattrs)
    if kind is Kind.SYMLINK:
        return with_xattrs(link("usr/newlink", "lib"), *xattrs)
    return f("usr/newfile", xattrs=xattrs)


@pytest.mark.parametrize(("case", "kind", "key", "value", "hint"), XATTRS_REFUSED,
                         ids=[c[0] for c in XATTRS_REFUSED])
def test_xattrs_outside_the_policy_are_refused(
        live: tuple[Path, Path, Path], case: str, kind: Kind, key: str, value: bytes,
        hint: str) -> None:
    top, root, run = live
    before = snapshot(top)
    with pytest.raises(ApplyRefused) as caught:
        apply(top, root, run, [f("usr/fine"), _member(kind, ((key, value),))])
    assert "xattr" in caught.value.message, caught.value.message
    assert hint in (caught.value.hint or ""), caught.value.hint
    assert snapshot(top) == before


def test_capabilities_with_allow_setuid(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("usr/bin/ping", xattrs=(("security.capability", capability()),)),
                           f("usr/bin/ns", xattrs=(("security.capability",
                                                    capability(3, effective=False)),))],
          allow_setuid=True)
    assert os.getxattr(root / "usr/bin/ping", "security.capability") == capability()


def test_xattrs_allowed_by_default_are_written(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [
        f("usr/a", xattrs=(("user.origin", b"u"), ("system.posix_acl_access", GOOD_ACL),
                           ("security.selinux", b"system_u:object_r:bin_t:s0\0"))),
        with_xattrs(d("usr/shared"), ("system.posix_acl_default", SHORT_ACL)),
    ])
    assert os.getxattr(root / "usr/a", "user.origin") == b"u"
    assert os.getxattr(root / "usr/a", "system.posix_acl_access") == GOOD_ACL
    assert os.getxattr(root / "usr/shared", "system.posix_acl_default") == SHORT_ACL


def test_a_namespace_let_through_by_name(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("usr/a", xattrs=(("trusted.overlay.opaque", b"y"),
                                              ("security.ima", b"\x03\x02")))],
          allow_xattrs=("trusted.overlay", "security.ima"))
    assert os.getxattr(root / "usr/a", "trusted.overlay.opaque") == b"y"
    with pytest.raises(ApplyRefused, match=r"trusted\.other"):
        apply(top, root, run, [f("usr/b", xattrs=(("trusted.other", b"y"),))],
              allow_xattrs=("trusted.overlay",))
    with pytest.raises(ApplyRefused, match=r"security\.imax"):
        apply(top, root, run, [f("usr/b", xattrs=(("security.imax", b"y"),))],
              allow_xattrs=("security.ima",))


def test_a_hardlink_to_an_existing_file_of_the_root_is_refused(
        live: tuple[Path, Path, Path]) -> None:
    """Links go only to earlier files of the update (whose setuid bits and
    capabilities were judged), never to a file already in ROOT."""
    top, root, run = live
    (root / "usr/bin/su").write_bytes(b"su")
    os.chmod(root / "usr/bin/su", 0o4755)
    with pytest.raises(ApplyRefused, match="not an earlier file"):
        apply(top, root, run, [hard("usr/bin/mysu", "usr/bin/su")])


@given(st.binary(max_size=80))
def test_the_acl_parser_never_raises(value: bytes) -> None:
    """Any value is judged: accepted, or refused with a reason."""
    from dmoverlay.apply import xattrpolicy

    verdict = xattrpolicy.refusal("system.posix_acl_access", value, Kind.FILE,
                                  allow_setuid=False, allowed=())
    assert verdict is None or all(isinstance(s, str) and s for s in verdict)


@st.composite
def acl_entries(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """Mostly well-formed ACLs (as setfacl writes them), some shuffled."""
    perm = st.sampled_from([0, 4, 5, 6, 7, 7, 8])
    ident = st.sampled_from([0, 1, 1000, 1001, NONE])

    def named(tag: int) -> list[tuple[int, int, int]]:
        return [(tag, draw(perm), draw(ident)) for _ in range(draw(st.integers(0, 2)))]

    entries = [(USER_OBJ, draw(perm), draw(ident)), *named(USER),
               (GROUP_OBJ, draw(perm), draw(ident)), *named(GROUP)]
    if draw(st.booleans()):
        entries.append((MASK, draw(perm), NONE))
    entries.append((OTHER, draw(perm), NONE))
    if draw(st.integers(0, 3)) == 0:
        entries = draw(st.permutations(entries))
    return entries


@given(acl_entries())
def test_an_acl_the_policy_accepts_the_kernel_accepts(
        tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[int, int, int]]) -> None:
    """The other way round may differ (the policy is stricter): what matters
    is that no accepted ACL fails when it is written."""
    from dmoverlay.apply import xattrpolicy

    value = acl(*entries)
    target = tmp_path_factory.getbasetemp() / "acl-target"
    target.touch()
    if xattrpolicy.acl_problem(value) is None:
        os.setxattr(target, "system.posix_acl_access", value)
        os.removexattr(target, "system.posix_acl_access")


@given(st.sampled_from([0x01000000, 0x02000000, 0x02000001, 0x03000000, 0x03000001,
                        0x02000002, 0x04000000]),
       st.sampled_from([8, 16, 20]), st.sampled_from([b"", b"\0\0\0\0", b"\xff" * 4]))
def test_capabilities_the_policy_accepts_the_kernel_accepts(
        tmp_path_factory: pytest.TempPathFactory, magic: int, size: int, tail: bytes) -> None:
    from dmoverlay.apply import xattrpolicy

    value = struct.pack("<I", magic) + bytes(size - 4) + tail
    target = tmp_path_factory.getbasetemp() / "cap-target"
    target.touch()
    if xattrpolicy.capability_problem(value) is None:
        os.setxattr(target, "security.capability", value)
        os.removexattr(target, "security.capability")


def test_capabilities_as_setcap_writes_them(tmp_path: Path) -> None:
    """Judged as privilege: refused by default, accepted with --allow-setuid."""
    from dmoverlay.apply import xattrpolicy

    if shutil.which("setcap") is None:
        pytest.skip("setcap (libcap2-bin) is not installed")
    binary = tmp_path / "ping"
    binary.touch()
    subprocess.run(["setcap", "cap_setuid,cap_sys_admin=ep", str(binary)], check=True)
    value = os.getxattr(binary, "security.capability")
    assert xattrpolicy.capability_problem(value) is None
    assert xattrpolicy.refusal("security.capability", value, Kind.FILE, allow_setuid=True,
                               allowed=()) is None
    refused = xattrpolicy.refusal("security.capability", value, Kind.FILE,
                                  allow_setuid=False, allowed=())
    assert refused is not None and "--allow-setuid" in refused[1]


def test_without_a_live_run_no_link_leads_into_root_run(live: tuple[Path, Path, Path]) -> None:
    """ROOT/run is where the live /run is mounted: with no --run-dir, a way
    into it through a link is refused like run/ itself."""
    top, root, _ = live
    _links(root, top / "live/run")
    before = snapshot(top)
    for name in ("toprun/x", "var/run/x", "var/run2/x", "usr/lib/top/run/x", "run/x"):
        with pytest.raises(ApplyRefused, match="needs the live /run"):
            apply(top, root, None, [f(name)])
    assert snapshot(top) == before


# ------------------------------------------------------------------ from the command line

def _tar(top: Path, *members: tuple[str, dict[str, str]]) -> Path:
    import tarfile

    archive = top / "update.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, pax in members:
            info = tarfile.TarInfo(name)
            info.size = 1
            info.pax_headers = pax
            tar.addfile(info, io.BytesIO(b"x"))
    return archive


def test_cli_an_xattr_refused_then_let_through(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    archive = _tar(top, ("usr/a", {"SCHILY.xattr.trusted.overlay.opaque": "y"}))
    before = snapshot(root), snapshot(run)
    refused = dmoverlay("apply", str(archive), "--root", str(root), "--run-dir", str(run))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "error: refused: usr/a: xattr trusted.overlay.opaque" in refused.stderr
    assert "--allow-xattr trusted.overlay.opaque" in refused.stderr
    assert (snapshot(root), snapshot(run)) == before
    done = dmoverlay("apply", str(archive), "--root", str(root), "--run-dir", str(run),
                     "--allow-xattr", "trusted.overlay")
    assert done.returncode == 0, done.stderr
    assert os.getxattr(root / "usr/a", "trusted.overlay.opaque") == b"y"


def test_cli_a_whiteout_of_the_journal_is_one_error_line(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("etc/first")])  # a journal at the top of ROOT now
    archive = _tar(top, (".wh..dmoverlay", {}))
    before = snapshot(root), snapshot(run)
    result = dmoverlay("apply", str(archive), "--root", str(root), "--run-dir", str(run))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: refused: .wh..dmoverlay: reaches /.dmoverlay, a name dmoverlay "
                      "keeps for its journal and temporary files"], result.stderr
    assert (snapshot(root), snapshot(run)) == before
    assert (root / ".dmoverlay/journal").is_dir()
