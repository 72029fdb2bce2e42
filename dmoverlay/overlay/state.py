"""The record of an overlay: each step setup took, written before the next
one, so that teardown can undo even a setup that died half-way.  Read back,
it is input like any other: checked before anything acts on it."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from dmoverlay.core import rundir
from dmoverlay.core.errors import NoOverlay, OverlayError
from dmoverlay.overlay.dmtable import Mode, Names

# typing only for the type checker: its import is ms of the boot's start-up (boot.hooks)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class StepKind(StrEnum):
    """What a step attached, and so how teardown undoes it (the values are
    what state files hold)."""

    DIR = "dir"  # a directory setup made: removed once empty
    MOUNT = "mount"
    LOOP = "loop"
    DM = "dm"
    FILE = "file"  # a sparse COW or thin-pool file in RAM
    NEWFILE = "newfile"  # a persistent overlay file this setup made


@dataclass
class Step:
    """One thing setup attached, and what undoes it."""

    kind: StepKind
    what: str  # mount point, loop device, dm name, path
    backing: str = ""  # loop: its file

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Step:
        """A step as a state file holds it: ValueError for a kind no setup
        records (a state file is input like any other)."""
        step = cls(**record)
        try:
            step.kind = StepKind(step.kind)
        except ValueError:
            raise ValueError(f"a step of unknown kind {step.kind!r}") from None
        return step


@dataclass
class State:
    """What an overlay consists of, written after every step of setup, so
    that teardown can undo even a setup that died half-way."""

    name: str
    target: str
    image: str
    overlay_size: int
    cow_file: str = ""
    mode: str = Mode.RAM.value
    overlay: str = ""  # the persistent overlay: file or device
    thin: bool = False
    medium: str = ""  # where the live medium is mounted: updates named by a path are on it
    ram_copy: int = 0  # bytes of the image copied into RAM (rd.live.ram); 0: read from the medium
    steps: list[Step] = field(default_factory=list)
    complete: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> State:
        data: dict[str, Any] = json.loads(text)
        steps = [Step.from_record(s) for s in data.pop("steps", [])]
        return cls(**data, steps=steps)

    def save(self, path: Path) -> None:
        """Write the state whole, then rename it into place: never through a
        name someone planted (a link at the temporary name is replaced, not
        followed)."""
        tmp = path.with_suffix(".tmp")
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)


def state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


STATE_MAX = 1 << 20  # bytes: a state file holds a few dozen steps
_LOOP = re.compile(r"/dev/loop[0-9]+")


def load_state(state_dir: Path, name: str) -> tuple[State, Path]:
    """The state setup recorded, checked before anything acts on it: /run
    is writable by more than setup (an update's run/ entries land there), so
    a state file is input like any other."""
    Names(name)  # a name that cannot leave the state directory
    check_state_dir(state_dir)
    path = state_path(state_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoOverlay(f"no overlay named {name!r} is set up",
                           hint=f"nothing recorded in {path}") from None
    except OSError as exc:
        raise OverlayError(f"{path}: cannot read the state ({exc.strerror})",
                           hint="it is not a file setup wrote; look at it, remove it") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OverlayError(f"{path}: not a state file setup wrote (not a regular file "
                               "of this user)", hint="look at it, and remove it")
        text = f.read(STATE_MAX + 1)
    try:
        if len(text) > STATE_MAX:
            raise ValueError(f"over {STATE_MAX} bytes")
        state = State.from_json(text.decode())
        check_state(state, state_dir, name)
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise OverlayError(f"{path}: unreadable state ({exc})",
                           hint="nothing was torn down: look at it, and undo by hand") from None
    return state, path


def check_state_dir(state_dir: Path) -> None:
    """The state directory is setup's own: a real directory (not a link to
    elsewhere), of this user, that nobody else may write in."""
    try:
        why = rundir.why_not_private(os.lstat(state_dir))
    except FileNotFoundError:
        return  # nothing recorded, or setup makes it
    if why is not None:
        raise OverlayError(f"{state_dir}: not a private directory of this user: {why}",
                           hint="something planted it: look at it, remove it, try again")


def check_state(state: State, state_dir: Path, name: str) -> None:
    """ValueError unless every step is one setup could have recorded: teardown
    unmounts, detaches, removes and deletes only what names its own things."""
    if state.name != name or not isinstance(state.complete, bool):
        raise ValueError(f"it names the overlay {state.name!r}")
    if type(state.ram_copy) is not int or state.ram_copy < 0:
        raise ValueError(f"ram_copy is not a size: {state.ram_copy!r}")
    work = os.fspath(state_dir / name)  # as setup makes it
    dirs = {work}  # mount points are directories setup made (or the target)
    names = Names(name).all()
    files = (f"{name}.cow", f"{name}.thin-meta", f"{name}.thin-data")
    allowed: dict[StepKind, Callable[[Step], bool]] = {
        StepKind.DIR: lambda s: s.what == work or (
            os.path.dirname(s.what) == work and os.path.basename(s.what) not in ("", ".", "..")),
        StepKind.MOUNT: lambda s: s.what in dirs or s.what == state.target,
        StepKind.DM: lambda s: s.what in names,
        StepKind.LOOP: lambda s: (not s.what or bool(_LOOP.fullmatch(s.what)))
        and os.path.isabs(s.backing),
        StepKind.FILE: lambda s: os.path.isabs(s.what) and os.path.normpath(s.what) == s.what
        and os.path.basename(s.what) in files,
        # removed only while setup is unfinished, and only if it holds a store
        StepKind.NEWFILE: lambda s: os.path.isabs(s.what),
    }
    if not isinstance(state.medium, str):
        raise ValueError("its medium is not a path")
    for step in state.steps:
        if not isinstance(step.what, str) or not isinstance(step.backing, str) \
                or not isinstance(step.kind, StepKind):
            raise ValueError(f"a step of unknown form: {step!r}")
        ok = allowed.get(step.kind)
        if ok is None or not ok(step):
            raise ValueError(f"a {step.kind} step setup would not record: {step.what!r}")
        if step.kind is StepKind.DIR:
            dirs.add(step.what)
    if state.medium and state.medium not in {s.what for s in state.steps
                                             if s.kind is StepKind.MOUNT}:
        raise ValueError(f"its medium {state.medium!r} is not a mount point setup made")
