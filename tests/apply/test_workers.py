"""Work split over forked processes (dmoverlay.apply.workers): the parts, and what
comes back from the children, their failures included."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmoverlay.apply.workers import chunks, jobs_for, run_pulled, run_split
from dmoverlay.core.errors import ImageError, WorkerDied


def test_jobs_for() -> None:
    assert jobs_for(10, 0, least=256) == 1  # too little work for a fork
    assert jobs_for(1000, 0, least=256) >= 1
    assert jobs_for(1000, 3, least=256) == 3  # asked for: always honoured
    assert jobs_for(2, 8, least=256) == 2  # never more processes than pieces of work
    assert jobs_for(0, 4, least=256) == 1


items_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 50)), max_size=60)


@given(items_strategy, st.integers(1, 120))
def test_chunks_keep_every_item_once_in_order_and_in_one_group(items: list[tuple[int, int]],
                                                               most: int) -> None:
    tagged = [(d, c, n) for n, (d, c) in enumerate(items)]
    cut = chunks(tagged, group=lambda i: i[0], cost=lambda i: i[1], most=most)
    assert all(cut)
    assert Counter(i for c in cut for i in c) == Counter(tagged)
    for chunk in cut:
        assert len({d for d, _, _ in chunk}) == 1
        assert [i[2] for i in chunk] == sorted(i[2] for i in chunk)
        assert len(chunk) == 1 or sum(c for _, c, _ in chunk) <= most
    costs = [sum(c for _, c, _ in chunk) for chunk in cut]
    assert costs == sorted(costs, reverse=True)  # the costliest handed out first


def test_chunks_cut_a_large_directory() -> None:
    items = [("big", 1)] * 130 + [("small", 1)] * 2
    cut = chunks(items, group=lambda i: i[0], cost=lambda i: i[1], most=64)
    assert [len(c) for c in cut] == [64, 64, 2, 2]


@given(st.lists(st.integers(0, 1000), max_size=200), st.integers(1, 3))
@settings(max_examples=20, deadline=None)
def test_run_pulled_does_every_chunk_once_in_order(values: list[int], jobs: int) -> None:
    assert run_pulled(values, lambda v: (v, v * 2), jobs) == [(v, v * 2) for v in values]


def test_run_pulled_shares_the_chunks_out(tmp_path: Path) -> None:
    """Two processes, chunks of unequal cost: both take chunks, none twice."""
    def work(n: int) -> int:
        (tmp_path / f"{n}.{os.getpid()}").touch()
        time.sleep(0.02 if n % 3 == 0 else 0.001)
        return os.getpid()

    pids = run_pulled(list(range(40)), work, 2)
    assert len(set(pids)) == 2
    assert sorted(int(p.name.split(".")[0]) for p in tmp_path.iterdir()) == list(range(40))


def test_run_pulled_failure_in_a_child_comes_back(tmp_path: Path) -> None:
    def work(n: int) -> int:
        if os.getpid() != parent:
            raise ImageError(f"chunk {n} is bad")
        time.sleep(0.01)
        return n

    parent = os.getpid()
    with pytest.raises(ImageError, match=r"chunk \d+ is bad"):
        run_pulled(list(range(20)), work, 2)


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
        (tmp_path / "pid").write_text(str(os.getpid()))
        os.rename(tmp_path / "pid", started)  # whole when it appears
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
