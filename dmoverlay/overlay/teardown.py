"""Undoing an overlay: the recorded steps, newest first.  What is busy is
said (and by whom), and stays recorded so that a later teardown can finish.

At shutdown the recorded paths may no longer be where setup put them:
dracut's shutdown runs in the unpacked initramfs, where the old system's /run
was moved under /oldsys.  `moved_under` names such a place: every path is
then looked for as recorded and under it, and a mount is unmounted wherever
it shows (once in each place, so that its filesystem is really let go)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.errors import DmoverlayError, NoOverlay, OverlayError
from dmoverlay.core.run import run
from dmoverlay.overlay import blockdev, persistent
from dmoverlay.overlay.kernel import dm_exists, dm_remove_argv, loops_backed_by, require_root
from dmoverlay.overlay.state import State, Step, StepKind, load_state


def teardown(state_dir: Path, name: str, *, moved_under: str = "") -> State | None:
    """Undo an overlay; None when there was none (teardown is idempotent).
    `moved_under`: a directory the overlay's mounts may have been moved
    under since setup (dracut's shutdown: /oldsys)."""
    require_root()
    views = Views.of(moved_under)
    try:
        state, path = load_state(state_dir, name)
    except NoOverlay:
        return None
    unwind(state, path, views=views)
    return state


class Views(tuple[str, ...]):
    """The prefixes a recorded path is looked for under: "" (as recorded),
    then the places its mounts may have been moved to."""

    @classmethod
    def of(cls, moved_under: str = "") -> Views:
        if not moved_under:
            return cls(("",))
        where = os.path.normpath(moved_under)
        if not os.path.isabs(moved_under) or where == "/" or not os.path.isdir(where) \
                or os.path.realpath(where) != where:
            raise OverlayError(f"{moved_under}: not a directory named by its real, absolute path",
                               hint="name where the old system's mounts are (dracut's "
                                    "shutdown: /oldsys)")
        return cls(("", where))

    def all(self, path: str) -> list[str]:
        return [prefix + path for prefix in self]

    def first(self, path: str) -> str:
        """Where `path` is seen first; as recorded when nowhere."""
        return next((p for p in self.all(path) if os.path.lexists(p)), path)


HERE = Views(("",))


def unwind(state: State, path: Path, *, views: Views = HERE) -> None:
    """Undo the recorded steps, newest first; what is busy is said, and kept
    recorded so that a later teardown can finish."""
    while state.steps:
        step = state.steps[-1]
        _undo(step, complete=state.complete, views=views)
        state.steps.pop()
        state.save(path)
    path.unlink(missing_ok=True)


def release(state: State, path: Path, steps: list[Step]) -> None:
    """Undo some steps while setup goes on (the medium, once its image is
    in RAM), newest first, each dropped from the record once undone: the
    record covers what exists at every moment, and a teardown later finds
    nothing of them to undo again."""
    for step in reversed(steps):
        _undo(step, complete=False)
        state.steps = [s for s in state.steps if s is not step]
        state.save(path)


def _undo(step: Step, *, complete: bool, views: Views = HERE) -> None:
    if step.kind is StepKind.MOUNT:
        for where in views.all(step.what):
            if os.path.ismount(where):
                _retry(partial(blockdev.unmount, where), what=where)
    elif step.kind is StepKind.DM:
        if dm_exists(step.what):
            _retry(partial(run, dm_remove_argv(step.what)), what=f"/dev/mapper/{step.what}")
    elif step.kind is StepKind.LOOP:
        backing = views.first(step.backing)
        found = [step.what] if step.what else \
            [dev for seen in views.all(step.backing) for dev in loops_backed_by(seen)]
        for dev in found:
            blockdev.loop_teardown(dev, backing=backing)
    elif step.kind is StepKind.FILE or (step.kind is StepKind.NEWFILE and not complete):
        _remove_ours(views.first(step.what), store=step.kind is StepKind.NEWFILE)
    elif step.kind is StepKind.DIR:
        where = views.first(step.what)
        if os.path.ismount(where):
            return
        # a mount point or the directory holding them: empty once unmounted;
        # anything else in it is not ours to delete
        with suppress(FileNotFoundError, NotADirectoryError):
            try:
                os.rmdir(where)
            except OSError as exc:
                log.info(f"warning: {where} kept: {exc.strerror}")


def _remove_ours(path: str, *, store: bool) -> None:
    """Delete a file setup made: a regular file (never through a link), and
    for a new overlay file, only while it holds nothing but a store."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.info(f"warning: {path} kept: {exc.strerror}")
        return
    with os.fdopen(fd, "rb") as f:
        mine = stat.S_ISREG(os.fstat(fd).st_mode)
        head = f.read(4096)
        if mine and store and head.strip(b"\0"):  # all zero: new, or not yet allocated
            try:
                persistent.read_header(head, where=path)
            except DmoverlayError:
                mine = False
    if mine:
        os.unlink(path)
    else:
        log.info(f"warning: {path} kept: not the file setup made")


def _retry(action: Callable[[], object], *, what: str) -> None:
    for attempt in range(5):
        try:
            action()
            return
        except DmoverlayError as exc:
            if attempt == 4:
                users = busy_users(what)
                raise OverlayError(f"{what} is busy" + (f": used by {users}" if users else ""),
                                   hint=f"stop them and run teardown again ({exc.message})") \
                    from None
            time.sleep(0.2 * (attempt + 1))


def busy_users(path: str) -> str:
    """Processes whose cwd, root or open files are at or below `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for link in _proc_links(pid):
            if link == path or link.startswith(path.rstrip("/") + "/"):
                comm = Path(f"/proc/{pid}/comm").read_text().strip() if \
                    Path(f"/proc/{pid}/comm").exists() else "?"
                found.append(f"{comm} ({pid})")
                break
    return ", ".join(found[:10])


def _proc_links(pid: str) -> list[str]:
    names = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
    with suppress(OSError):  # the process is gone, or not ours to read
        names += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    links = []
    for name in names:
        try:
            links.append(os.readlink(name))
        except OSError:
            continue
    return links
