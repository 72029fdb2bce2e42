"""What the benchmarks share: running a command quietly, timing, the load
average, unmounting, and printing aligned tables."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core.run import clean_env

# A merged /usr, as the roots the benchmarks write into have it.
ROOT_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

# apply-live-updates.sh of dracut (dracut-ng), its loop as written there.
DRACUT_LOOP = r"""
cd "$1" || exit 1
NEWROOT=$2
find . -depth -type d -exec mkdir -p "$NEWROOT/{}" \;
find . -depth \! -type d -exec cp -a "{}" "$NEWROOT/{}" \;
"""


class Failed(Exception):
    pass


def compile_bytecode() -> None:
    """Bytecode for dmoverlay written now, as installing a package does:
    with PYTHONDONTWRITEBYTECODE set (or a read-only tree), every timed
    process would otherwise compile the modules changed since it was last
    written, and the start-up measured would be a developer's, not a user's."""
    top = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(top / "dmoverlay")],
                   stdout=subprocess.DEVNULL, check=False)


def quiet_run(argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> str:
    """Run a command, its output discarded; its stderr is returned, and shown
    if it fails."""
    proc = subprocess.run(argv, env=env or clean_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise Failed(f"failed (exit {proc.returncode}): {' '.join(map(str, argv))}")
    return proc.stderr


def unmount(path: Path) -> None:
    """umount, retried while busy; a lazy unmount at last."""
    for attempt in range(3):
        if subprocess.run(["umount", path]).returncode == 0:
            return
        time.sleep(1 + attempt)
    subprocess.run(["umount", "-l", path], check=True)


# --------------------------------------------------------------- timing


def cpu_seconds(*, own: bool = True) -> float:
    """User + system CPU time of the children waited for (and theirs), and of
    this process unless `own` is false."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = used.ru_utime + used.ru_stime
    if own:
        used = resource.getrusage(resource.RUSAGE_SELF)
        total += used.ru_utime + used.ru_stime
    return total


@dataclass
class Lap:
    wall: float = 0.0  # seconds, time.monotonic
    cpu: float = 0.0  # seconds, cpu_seconds()


@contextmanager
def stopwatch(*, own_cpu: bool = True) -> Iterator[Lap]:
    """Times the `with` block: its Lap is filled in when the block ends."""
    lap = Lap()
    cpu = cpu_seconds(own=own_cpu)
    start = time.monotonic()
    yield lap
    lap.wall = time.monotonic() - start
    lap.cpu = cpu_seconds(own=own_cpu) - cpu


def load_average() -> float:
    """The 1-minute load average: is a run noisy?"""
    return os.getloadavg()[0]


def load_text(before: float, after: float) -> str:
    return f"load average {before:.2f} before, {after:.2f} after"


# --------------------------------------------------------------- tables

# A column's spec is the format spec of an f-string field, as ">9.2f" or "<32",
# its alignment first: alignment and width frame the title and every cell, the
# rest formats a value.
_SPEC = re.compile(r"(?P<align>[<>^])(?P<sign>[-+ ]?)(?P<width>\d*)(?P<rest>.*)")


@dataclass(frozen=True)
class Column:
    title: str
    spec: str
    unit: str = ""  # written right after each value, inside the width

    def _parts(self) -> tuple[str, str]:
        m = _SPEC.fullmatch(self.spec)
        assert m, self.spec
        return m["align"] + m["width"], m["sign"] + m["rest"]

    def head(self) -> str:
        frame, _ = self._parts()
        return f"{self.title:{frame}}"

    def cell(self, value: object) -> str:
        frame, value_spec = self._parts()
        return f"{format(value, value_spec) + self.unit:{frame}}"


@dataclass(frozen=True)
class Table:
    """Fixed-width columns, each line after `indent`."""

    columns: tuple[Column, ...]
    indent: str = ""

    def header(self) -> str:
        return self.indent + "".join(c.head() for c in self.columns)

    def row(self, *values: object) -> str:
        """A line of the first len(values) columns."""
        return self.indent + "".join(c.cell(v) for c, v in zip(self.columns, values, strict=False))
