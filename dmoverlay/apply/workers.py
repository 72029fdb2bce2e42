"""Splitting the per-file work of an apply over forked processes.

Writing ten thousand files is a few system calls and a little Python for
each.  One process spends about as long in Python as in the kernel; a second
process (not a thread: they would share one interpreter lock) does the other
half meanwhile.  The work comes in chunks of one directory each, so that the
processes seldom wait on the same directory's lock, and each process takes
the next chunk when it is done with one.

The children are forks of the caller: they share its open directories and
the spool, change only what their part names, and end with `os._exit`
(never running the caller's clean-up).  Each dies with its parent (a parent
killed at any point leaves no child writing behind it), and reports its
result or its exception through a pipe."""

from __future__ import annotations

import ctypes
import fcntl
import os
import pickle
import signal
from collections.abc import Callable, Hashable, Sequence
from contextlib import suppress
from typing import TypeVar

from dmoverlay.core.errors import WorkerDied

T = TypeVar("T")
R = TypeVar("R")

MAX_JOBS = 8
PR_SET_PDEATHSIG = 1
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
_libc = ctypes.CDLL(None, use_errno=True)



def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def jobs_for(count: int, asked: int, *, least: int) -> int:
    """How many processes for `count` pieces of work: `asked` if not 0, else
    one per CPU (at most MAX_JOBS) when there are at least `least` pieces,
    below which a fork costs more than it saves."""
    if asked:
        return max(1, min(asked, count or 1))
    if count < least:
        return 1
    return max(1, min(available_cpus(), MAX_JOBS, count))


def chunks(items: Sequence[T], group: Callable[[T], Hashable], cost: Callable[[T], int],
           most: int) -> list[list[T]]:
    """`items` cut into chunks to hand out one at a time: each from one group
    (a directory: processes then seldom wait on the same directory's lock),
    of a cost of at most `most` unless one item alone costs more.  Costliest
    first, so that the last chunks handed out are small; items keep their
    order inside a chunk."""
    groups: dict[Hashable, list[tuple[int, T]]] = {}
    for n, item in enumerate(items):
        groups.setdefault(group(item), []).append((n, item))
    pieces: list[tuple[int, int, list[T]]] = []  # (cost, first index, items)
    for members in groups.values():
        piece: list[T] = []
        piece_cost = first = 0
        for n, item in members:
            c = cost(item)
            if piece and piece_cost + c > most:
                pieces.append((piece_cost, first, piece))
                piece, piece_cost = [], 0
            if not piece:
                first = n
            piece.append(item)
            piece_cost += c
        pieces.append((piece_cost, first, piece))
    return [piece for _, _, piece in sorted(pieces, key=lambda p: (-p[0], p[1]))]


def run_pulled(pieces: Sequence[T], work: Callable[[T], R], jobs: int) -> list[R]:
    """work(piece) for every piece (a chunk), in `jobs` processes (this one and forked
    children) that each take the next chunk as soon as they are done with
    one: however the pieces' costs were misjudged, no process idles while
    another has a queue.  The results in the pieces' order; failures as in
    run_split."""
    if jobs <= 1 or len(pieces) <= 1:
        return [work(p) for p in pieces]
    ids = b"".join(n.to_bytes(4, "little") for n in range(len(pieces)))
    read_end, write_end = os.pipe()
    try:
        # it must hold every number at once (nobody reads it yet); over
        # pipe-max-size, the default (64 KiB: 16384 pieces) must do
        with suppress(OSError):
            fcntl.fcntl(write_end, F_SETPIPE_SZ, len(ids))
        fits = len(ids) <= fcntl.fcntl(write_end, F_GETPIPE_SZ)
        if fits:
            os.write(write_end, ids)
    finally:
        os.close(write_end)
    if not fits:
        os.close(read_end)
        return [work(p) for p in pieces]

    def pull(_: None) -> dict[int, R]:
        done = {}
        # each read takes one whole number: pipe reads of PIPE_BUF bytes or
        # fewer are atomic, and every number was written before any read
        while raw := os.read(read_end, 4):
            n = int.from_bytes(raw, "little")
            done[n] = work(pieces[n])
        return done

    try:
        results: dict[int, R] = {}
        for done in run_split([None] * jobs, pull):
            results.update(done)
    finally:
        os.close(read_end)
    return [results[n] for n in range(len(pieces))]


def run_split(parts: Sequence[T], work: Callable[[T], R]) -> list[R]:
    """work(part) for every part: the first here, each other in a forked
    child.  The results in the parts' order.  If any part fails, the others
    are stopped, and the first failure (in the parts' order) is raised once
    no child is left running."""
    if len(parts) <= 1:
        return [work(p) for p in parts]
    children: list[tuple[int, int]] = []  # (pid, read end)
    try:
        for part in parts[1:]:
            children.append(_fork(part, work))
        mine = work(parts[0])
    except BaseException:
        _stop(children)
        raise
    results: list[R] = [mine]
    for n, (pid, fd) in enumerate(children):
        outcome = _collect(pid, fd)
        children[n] = (0, -1)
        if isinstance(outcome, _Failed):
            _stop(children)
            raise outcome.error
        results.append(outcome.value)  # type: ignore[arg-type]
    return results


class _Done:
    def __init__(self, value: object) -> None:
        self.value = value


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _fork(part: T, work: Callable[[T], R]) -> tuple[int, int]:
    parent = os.getpid()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return pid, read_end
    # the child: never returns, never runs the parent's clean-up
    status = 1
    try:
        os.close(read_end)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
        try:
            outcome: _Done | _Failed = _Done(work(part))
        except BaseException as exc:  # every failure goes to the parent
            outcome = _Failed(exc)
        try:
            data = pickle.dumps(outcome)
        except Exception as exc:  # an unpicklable result or error
            data = pickle.dumps(_Failed(WorkerDied(f"a worker failed: {exc!r}")))
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]
        status = 0
    finally:
        os._exit(status)


def _collect(pid: int, fd: int) -> _Done | _Failed:
    with os.fdopen(fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if data:
        try:
            outcome = pickle.loads(data)
        except Exception:  # cut short: the child died writing
            outcome = None
        if isinstance(outcome, _Done | _Failed):
            return outcome
    why = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else f"exit status {os.waitstatus_to_exitcode(status)}")
    return _Failed(WorkerDied(f"a worker process ended without reporting ({why})",
                              hint="nothing was changed: what was written was undone"))


def _stop(children: list[tuple[int, int]]) -> None:
    for pid, fd in children:
        if pid:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if fd >= 0:
            os.close(fd)
