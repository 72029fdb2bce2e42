"""Property-based: random roots with symlinked directories, random updates,
checked against a small model of the intended result; and nothing outside
the root ever changes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest.mock import patch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmoverlay.apply import inroot
from dmoverlay.apply.execute import ApplyRefused
from tests.applykit import apply, f, snapshot

NAMES = ["a", "b", "c"]
LINKS = ["l1", "l2"]


class Model:
    """The root as a dict of real paths; links resolved as the live system would."""

    def __init__(self, dirs: set[str], links: dict[str, str], files: dict[str, bytes]) -> None:
        self.dirs, self.links, self.files = set(dirs), dict(links), dict(files)

    def place(self, name: str) -> str | None:
        """Where a file of the update lands, or None when it is refused."""
        parts = name.split("/")
        real: list[str] = []
        todo = parts[:-1]
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":  # link targets come from relpath, never above the root
                real.pop()
                continue
            here = "/".join([*real, part])
            if here in self.links:
                hops += 1
                if hops > 40:
                    return None
                target = self.links[here]
                todo = [p for p in target.split("/") if p] + todo
                if target.startswith("/"):
                    real = []
                continue
            if here in self.files:
                return None
            self.dirs.add(here)
            real.append(part)
        final = "/".join([*real, parts[-1]])
        if final in self.dirs:
            inside = [p for p in [*self.dirs, *self.links, *self.files]
                      if p.startswith(final + "/")]
            if inside:
                return None  # a file over a non-empty directory
            self.dirs.discard(final)  # an empty one is replaced
        self.links.pop(final, None)  # a file over a link replaces the link
        self.files[final] = b"new"
        return final


@st.composite
def roots(draw: st.DrawFn) -> tuple[set[str], dict[str, str], dict[str, bytes]]:
    dirs = {"/".join(p) for p in draw(st.lists(
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), max_size=6))}
    dirs |= {"/".join(d.split("/")[:i]) for d in dirs for i in range(1, d.count("/") + 1)}
    links: dict[str, str] = {}
    for name in draw(st.lists(st.sampled_from(LINKS), unique=True, max_size=2)):
        parent = draw(st.sampled_from(sorted(dirs | {""})))
        target = draw(st.sampled_from(sorted(dirs))) if dirs else "a"
        absolute = draw(st.booleans())
        where = f"{parent}/{name}" if parent else name
        if where not in dirs:
            links[where] = "/" + target if absolute else os.path.relpath(target, parent or ".")
    files: dict[str, bytes] = {}
    for d in sorted(dirs):
        if draw(st.booleans()):
            files[f"{d}/file"] = b"old"
    return dirs, links, files


updates = st.lists(st.lists(st.sampled_from(NAMES + LINKS + ["file"]), min_size=1, max_size=4)
                   .map("/".join), min_size=1, max_size=6, unique=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(roots(), updates, st.sampled_from([1, 2]), st.sampled_from([1, 24]))
def test_apply_matches_the_model(root_spec: tuple[set[str], dict[str, str], dict[str, bytes]],
                                 names: list[str], jobs: int, list_after: int) -> None:
    """`jobs`: files written by one process, or split over two; `list_after`:
    the planner learns what is in the root by lstat, or (1) by listing."""
    with patch.object(inroot, "LIST_AFTER", list_after):
        _check(root_spec, names, jobs)


def _check(root_spec: tuple[set[str], dict[str, str], dict[str, bytes]], names: list[str],
           jobs: int) -> None:
    dirs, links, files = root_spec
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        root, run, outside = top / "root", top / "run", top / "outside"
        for p in (root, run, outside):
            p.mkdir()
        (outside / "canary").write_bytes(b"canary")
        for d in sorted(dirs):
            (root / d).mkdir(parents=True, exist_ok=True)
        for where, target in links.items():
            os.symlink(target, root / where)
        for where, data in files.items():
            (root / where).write_bytes(data)
        model = Model(dirs, links, files)
        placed = [model.place(n) for n in names]
        before_all = snapshot(top)
        update = [f(n, f"new {n}".encode()) for n in names]
        if None in placed:
            try:
                apply(top, root, run, update, jobs=jobs)
            except ApplyRefused:
                assert snapshot(top) == before_all
                return
            raise AssertionError(f"expected a refusal for {names}")
        apply(top, root, run, update, jobs=jobs)
        last = {where: name for name, where in zip(names, placed, strict=True) if where}
        for where, name in last.items():
            assert (root / where).read_bytes() == f"new {name}".encode(), (name, where)
            assert not (root / where).is_symlink()
        for where, target in model.links.items():
            assert os.readlink(root / where) == target
        assert snapshot(outside) == {"canary": before_all["outside/canary"]}
