"""Work split over forked processes (dmoverlay.workers): the parts, and what
comes back from the children, their failures included."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.errors import ImageError
from dmoverlay.workers import WorkerDied, jobs_for, run_split, split


def test_jobs_for() -> None:
    assert jobs_for(10, 0, least=256) == 1  # too little work for a fork
    assert jobs_for(1000, 0, least=256) >= 1
    assert jobs_for(1000, 3, least=256) == 3  # asked for: always honoured
    assert jobs_for(2, 8, least=256) == 2  # never more processes than pieces of work
    assert jobs_for(0, 4, least=256) == 1


items_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 50)), max_size=60)


@given(items_strategy, st.integers(1, 4))
def test_split_keeps_every_item_once_and_in_order(items: list[tuple[int, int]],
                                                   jobs: int) -> None:
    tagged = [(d, c, n) for n, (d, c) in enumerate(items)]
    parts = split(tagged, jobs, group=lambda i: i[0], cost=lambda i: i[1])
    assert len(parts) <= jobs
    assert all(parts)
    assert Counter(i for p in parts for i in p) == Counter(tagged)
    for part in parts:
        assert [i[2] for i in part] == sorted(i[2] for i in part)


def test_split_keeps_directories_together_and_balances() -> None:
    items = [(d, 1) for d in "abcd" for _ in range(10)]
    parts = split(items, 2, group=lambda i: i[0], cost=lambda i: i[1])
    assert [len(p) for p in parts] == [20, 20]
    for part in parts:
        assert len({d for d, _ in part}) == 2


def test_split_cuts_a_directory_larger_than_a_share() -> None:
    items = [("big", 1)] * 30 + [("small", 1)] * 2
    parts = split(items, 2, group=lambda i: i[0], cost=lambda i: i[1])
    assert sorted(len(p) for p in parts) == [16, 16]


def test_split_weighs_large_files() -> None:
    items = [("a", 100)] + [("b", 1)] * 50 + [("c", 1)] * 50
    parts = split(items, 2, group=lambda i: i[0], cost=lambda i: i[1])
    assert sorted(len(p) for p in parts) == [1, 100]


def test_run_split_returns_results_in_order() -> None:
    pids = run_split([1, 2, 3], lambda n: (n * 10, os.getpid()))
    assert [r for r, _ in pids] == [10, 20, 30]
    assert pids[0][1] == os.getpid()  # the first part runs here
    assert len({p for _, p in pids}) == 3  # the others each in a child


def test_run_split_children_write_the_filesystem(tmp_path: Path) -> None:
    def work(names: list[str]) -> int:
        for name in names:
            (tmp_path / name).write_text(name)
        return len(names)

    assert run_split([["a", "b"], ["c"], ["d"]], work) == [2, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]


def test_a_childs_error_comes_back_whole() -> None:
    def work(n: int) -> int:
        if n == 2:
            raise ImageError("part two is bad", hint="look at part two")
        return n

    with pytest.raises(ImageError) as info:
        run_split([1, 2], work)
    assert info.value.message == "part two is bad"
    assert info.value.hint == "look at part two"


def test_an_os_error_in_a_child_keeps_its_errno(tmp_path: Path) -> None:
    def work(n: int) -> None:
        if n:
            os.rmdir(tmp_path / "missing")

    with pytest.raises(FileNotFoundError):
        run_split([0, 1], work)


def test_a_child_killed_is_a_worker_died_error() -> None:
    def work(n: int) -> int:
        if n:
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    with pytest.raises(WorkerDied, match="signal 9"):
        run_split([0, 1], work)


def test_the_parents_failure_stops_the_children(tmp_path: Path) -> None:
    started = tmp_path / "started"

    def work(n: int) -> None:
        if n == 0:
            while not started.exists():
                pass
            raise ImageError("parent part failed")
        started.write_text(str(os.getpid()))
        while True:  # stopped by the parent's failure, or never
            pass

    with pytest.raises(ImageError, match="parent part failed"):
        run_split([0, 1], work)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(started.read_text()), 0)


def test_children_do_not_run_the_parents_clean_up(tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    try:
        run_split([0, 1], lambda n: n)
    finally:
        with open(marker, "a") as out:
            out.write("x")
    assert marker.read_text() == "x"
