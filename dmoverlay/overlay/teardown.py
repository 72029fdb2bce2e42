"""Undoing an overlay: the recorded steps, newest first.  What is busy is
said (and by whom), and stays recorded so that a later teardown can finish."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from dmoverlay.core import log
from dmoverlay.core.errors import DmoverlayError, NoOverlay, OverlayError
from dmoverlay.core.run import run
from dmoverlay.overlay import blockdev, persistent
from dmoverlay.overlay.kernel import dm_exists, loops_backed_by, require_root
from dmoverlay.overlay.state import State, Step, StepKind, load_state


def teardown(state_dir: Path, name: str) -> State | None:
    """Undo an overlay; None when there was none (teardown is idempotent)."""
    require_root()
    try:
        state, path = load_state(state_dir, name)
    except NoOverlay:
        return None
    unwind(state, path)
    return state


def unwind(state: State, path: Path) -> None:
    """Undo the recorded steps, newest first; what is busy is said, and kept
    recorded so that a later teardown can finish."""
    while state.steps:
        step = state.steps[-1]
        _undo(step, complete=state.complete)
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


def _undo(step: Step, *, complete: bool) -> None:
    if step.kind is StepKind.MOUNT:
        if os.path.ismount(step.what):
            _retry(lambda: blockdev.unmount(step.what), what=step.what)
    elif step.kind is StepKind.DM:
        if dm_exists(step.what):
            _retry(lambda: run(["dmsetup", "remove", step.what]), what=f"/dev/mapper/{step.what}")
    elif step.kind is StepKind.LOOP:
        for dev in [step.what] if step.what else loops_backed_by(step.backing):
            blockdev.loop_teardown(dev, backing=step.backing)
    elif step.kind is StepKind.FILE or (step.kind is StepKind.NEWFILE and not complete):
        _remove_ours(step.what, store=step.kind is StepKind.NEWFILE)
    elif step.kind is StepKind.DIR and not os.path.ismount(step.what):
        # a mount point or the directory holding them: empty once unmounted;
        # anything else in it is not ours to delete
        with suppress(FileNotFoundError, NotADirectoryError):
            try:
                os.rmdir(step.what)
            except OSError as exc:
                log.info(f"warning: {step.what} kept: {exc.strerror}")


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
        if mine and store:
            try:
                persistent.read_header(f.read(4096), where=path)
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
