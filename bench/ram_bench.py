"""How fast `setup --ram` copies the image into RAM, against `cp` of the same
file into the same tmpfs, in one run.

A file of --mb MiB (default 512) is written under --scratch (default /var/tmp),
read once so that both copies start from the page cache, and copied --repeat
times (default 5) by each method into one tmpfs mounted for the run, the copy
removed after each: `dmoverlay.overlay.ramcopy.copy_image` in this process
(what setup runs), and `cp FILE TMPFS/` as a process.  The methods take turns,
and turns at going first, so that load hits them alike.  Best and median wall
time of each, printed as seconds per GiB, and the ratio of the bests (on a
shared machine, the best is the least disturbed).  Goal: <= 1.1 x cp.

Needs root (the tmpfs mount); runs on the host, no device-mapper needed:

    sudo .venv/bin/python bench/ram_bench.py [--mb 512] [--repeat 5] [--json]

The scratch directory and the tmpfs are removed at the end, even after a
failure.  Nothing here asserts a time: it prints figures for people.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common import Column, Table, load_average, load_text, stopwatch, unmount

from dmoverlay.core import log
from dmoverlay.core.run import clean_env
from dmoverlay.overlay.ramcopy import copy_image

MiB = 1 << 20
GiB = 1 << 30
GOAL = 1.1  # dmoverlay's copy at most 1.1 x cp


def say(message: str) -> None:
    print(f"ram_bench: {message}", file=sys.stderr, flush=True)


@contextmanager
def scratch_tmpfs(scratch: Path, size: int) -> Iterator[tuple[Path, Path]]:
    """A new directory under `scratch`, and a tmpfs of `size` bytes mounted in it."""
    top = Path(tempfile.mkdtemp(prefix="ram-bench-", dir=scratch))
    ram = top / "ram"
    ram.mkdir()
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(ram)], check=True)
        mounted = True
        yield top, ram
    finally:
        if mounted:
            unmount(ram)
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def make_file(path: Path, size: int) -> None:
    """Random bytes (a squashfs is compressed data): one random block repeated."""
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])
        f.flush()
        os.fsync(f.fileno())


def read_through(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def by_dmoverlay(source: Path, ram: Path, size: int) -> Callable[[], None]:
    def copy() -> None:
        copy_image(os.fspath(source), ram / source.name, size)
    return copy


def by_cp(source: Path, ram: Path) -> Callable[[], None]:
    def copy() -> None:
        subprocess.run(["cp", os.fspath(source), os.fspath(ram) + "/"], env=clean_env(),
                       stdin=subprocess.DEVNULL, check=True)
    return copy


def timings(methods: dict[str, Callable[[], None]], repeat: int, copy: Path,
            source: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for turn in range(repeat):
        order = names if turn % 2 == 0 else list(reversed(names))
        for name in order:
            read_through(source)  # both from the page cache, whatever ran before
            with stopwatch() as lap:
                methods[name]()
            if copy.stat().st_size != source.stat().st_size:
                raise SystemExit(f"ram_bench: {name} copied {copy.stat().st_size} bytes")
            copy.unlink()
            times[name].append(lap.wall)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="file size in MiB (default 512)")
    parser.add_argument("--repeat", type=int, default=5, help="copies per method (default 5)")
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("ram_bench: needs root (it mounts a tmpfs)")
    log.quiet = True  # the copy's progress lines are not timed output
    size = args.mb * MiB
    load_before = load_average()
    with scratch_tmpfs(args.scratch, size + 64 * MiB) as (top, ram):
        source = top / "squashfs.img"
        say(f"writing {args.mb} MiB to {source}")
        make_file(source, size)
        methods = {"dmoverlay copy_image": by_dmoverlay(source, ram, size),
                   "cp": by_cp(source, ram)}
        times = timings(methods, args.repeat, ram / source.name, source)
    load_after = load_average()
    best = {name: min(laps) for name, laps in times.items()}
    median = {name: statistics.median(laps) for name, laps in times.items()}
    per_gib = {name: seconds * GiB / size for name, seconds in best.items()}
    ratio = best["dmoverlay copy_image"] / best["cp"]
    if args.json:
        print(json.dumps({"mb": args.mb, "repeat": args.repeat, "seconds": times,
                          "seconds_per_gib": per_gib, "ratio": ratio, "goal": GOAL,
                          "load": [load_before, load_after]}, indent=2))
        return
    table = Table((Column("method", "<24"), Column("best", ">9.3f", " s"),
                   Column("per GiB", ">11.3f", " s"), Column("median", ">10.3f", " s")))
    print(f"copy of a {args.mb} MiB file into a tmpfs, {args.repeat} times each")
    print(table.header())
    for name, seconds in best.items():
        print(table.row(name, seconds, per_gib[name], median[name]))
    print(f"dmoverlay / cp: {ratio:.2f} x (goal <= {GOAL} x)")
    print(load_text(load_before, load_after))


if __name__ == "__main__":
    main()
