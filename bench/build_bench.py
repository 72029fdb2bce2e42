"""How long `dmoverlay build` takes, against two baselines, in one run.

Baseline 1 is mksquashfs alone, with dmoverlay's own flags, on the very ext4
image dmoverlay made: the least any ext4-in-squashfs build can cost.
Baseline 2 is the classic privileged flow: mkfs.ext4 on a sparse file, loop
mount, `cp -a`, umount, the same mksquashfs.  Nothing here asserts a time:
it prints ratios for people to read.

    .venv/bin/python bench/build_bench.py [--mb 400] [--repeat 1] [--tree DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TypeVar

from common import (
    ROOT_LINKS,
    Column,
    Failed,
    Table,
    compile_bytecode,
    load_average,
    load_text,
    quiet_run,
    stopwatch,
    unmount,
)

from dmoverlay.build.image import DEFAULT_LABEL
from dmoverlay.build.squashfs import Compressor, SquashOptions, mksquashfs_argv
from dmoverlay.core.run import clean_env

T = TypeVar("T")
MB = 1000 * 1000
COMPRESSORS = (Compressor.XZ, Compressor.ZSTD)
MIN_SHARE = 256 * 1024
GOAL = 1.15  # the project's goal: build <= 1.15 x mksquashfs alone
# Copied into the tree: /usr as a merged-/usr root has it, with the usual
# top-level links.  Not /etc: it holds this machine's secrets.
SOURCE = Path("/usr")
ROOT_DIRS = ("dev", "etc", "home", "proc", "root", "run", "sys", "tmp", "var")


@dataclass
class Row:
    step: str
    compression: str
    seconds: float
    cpu_seconds: float  # of the commands run; the kernel's loop and writeback work is not in it
    squashfs_bytes: int
    ratio: float = 0.0  # vs mksquashfs alone, same compression
    phases: dict[str, float] = field(default_factory=dict)  # dmoverlay's own step times


# ---------------------------------------------------------------- the tree


def tree_bytes(path: Path) -> int:
    """Bytes of files and symlinks under `path` (itself included)."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for top, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            total += os.lstat(os.path.join(top, name)).st_size
    return total


def fill(src: Path, dest: Path, budget: int) -> int:
    """Copy a sample of `src` into `dest` (a new directory), about `budget`
    bytes: every child gets an equal share of what is left, smallest first,
    so small directories come whole and large ones are sampled the same way.
    Returns the bytes copied."""
    dest.mkdir()
    sized = sorted((tree_bytes(c), c) for c in src.iterdir())
    whole: list[Path] = []
    used = 0
    for i, (size, child) in enumerate(sized):
        share = (budget - used) // (len(sized) - i)
        if size <= share:
            whole.append(child)
            used += size
        elif share >= MIN_SHARE and child.is_dir() and not child.is_symlink():
            used += fill(child, dest / child.name, share)
        # else left out: a file larger than its share, or a share too small
        # to sample (that would make a tree of empty directories)
    if whole:
        subprocess.run(["cp", "-a", "-t", dest, *whole], check=True)
    if not any(dest.iterdir()):
        dest.rmdir()
        return 0
    shutil.copystat(src, dest)  # last: copying into dest changed its mtime
    return used


def make_tree(root: Path, mb: int, *, partial: Path) -> None:
    """Build the tree in `partial` (scratch), then move it to `root`: an
    interrupted copy is never mistaken for a tree to reuse."""
    partial.mkdir()
    for name in ROOT_DIRS:
        (partial / name).mkdir()
    fill(SOURCE, partial / "usr", mb * MB)
    for name, target in ROOT_LINKS.items():
        if (partial / target).exists():
            os.symlink(target, partial / name)
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(partial, root)


def tree_summary(root: Path) -> tuple[int, int]:
    entries = 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))
    return entries, tree_bytes(root)


# --------------------------------------------------------------- measuring


def best_of(repeat: int, job: Callable[[], T], *,
            before: Callable[[], None]) -> tuple[float, float, T]:
    """The fastest of `repeat` runs of `job`, each after an untimed `before`
    that clears its outputs: its wall seconds, the CPU seconds of the commands
    it ran (less disturbed by other load), and what it returned."""
    best: tuple[float, float, T] | None = None
    for _ in range(repeat):
        before()
        with stopwatch(own_cpu=False) as lap:
            value = job()
        if best is None or lap.wall < best[0]:
            best = (lap.wall, lap.cpu, value)
    assert best is not None
    return best


def phases(progress: str) -> dict[str, float]:
    """dmoverlay's own step times from its progress lines (`==> making ...`,
    then `done in 4.2 s`), by the first word of each top-level step."""
    found: dict[str, float] = {}
    stack: list[str] = []
    for line in progress.splitlines():
        text = line.strip()
        if text.startswith("==> "):
            stack.append(text[4:].split()[0])
        elif text.startswith("done in ") and stack:
            name = stack.pop()
            if not stack:
                found[name] = float(text.split()[2])
    return found


def remove(*paths: Path) -> Callable[[], None]:
    def clear() -> None:
        for p in paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return clear


def dmoverlay_build(exe: str, tree: Path, out: Path, repeat: int, *args: str) -> Row:
    def job() -> str:
        # Not -q: the progress lines (on stderr, not a terminal) give the step times.
        return quiet_run([exe, "build", tree, "-o", out, *args], env=dict(os.environ))

    wall, cpu, progress = best_of(repeat, job, before=remove(out))
    return Row("dmoverlay build", "", wall, cpu, out.stat().st_size, phases=phases(progress))


def squashfs_epoch(image: Path) -> int:
    """The mkfs time in a squashfs superblock: dmoverlay's epoch."""
    with open(image, "rb") as f:
        head = f.read(12)
    return int(struct.unpack_from("<I", head, 8)[0])


def mksquashfs(src: Path, out: Path, comp: Compressor, epoch: int) -> None:
    quiet_run(mksquashfs_argv(src, out, SquashOptions(compressor=comp), epoch=epoch))


def mksquashfs_alone(built: Path, work: Path, comp: Compressor, repeat: int) -> tuple[Row, int]:
    """Baseline 1, on the rootfs.img unpacked from dmoverlay's own image.
    Also returns that rootfs.img's size."""
    src = work / f"alone-{comp}"
    quiet_run(["unsquashfs", "-no-progress", "-d", src, built])
    out = work / f"alone-{comp}.img"
    epoch = squashfs_epoch(built)
    wall, cpu, _ = best_of(repeat, lambda: mksquashfs(src, out, comp, epoch),
                           before=remove(out))
    rootfs_size = (src / "LiveOS" / "rootfs.img").stat().st_size
    row = Row("mksquashfs alone", comp, wall, cpu, out.stat().st_size)
    shutil.rmtree(src)
    return row, rootfs_size


def mkfs_classic(image: Path, size: int) -> None:
    with open(image, "xb") as f:
        f.truncate(size)
    conf = resources.files("dmoverlay") / "mke2fs.conf"
    # dmoverlay's profile and init flags: the same filesystem, filled another way.
    quiet_run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-m", "0", "-L", DEFAULT_LABEL,
               "-E", "lazy_itable_init=0,lazy_journal_init=0", image],
              env=clean_env({"MKE2FS_CONFIG": str(conf)}))


def classic(tree: Path, work: Path, comp: Compressor, size: int, epoch: int,
            repeat: int) -> Row:
    """Baseline 2: sparse file, mkfs.ext4, loop mount, cp -a, umount, mksquashfs."""
    src = work / f"classic-{comp}"
    image = src / "LiveOS" / "rootfs.img"
    mnt = work / "mnt"
    out = work / f"classic-{comp}.img"

    def job() -> None:
        image.parent.mkdir(parents=True)
        mkfs_classic(image, size)
        mnt.mkdir()
        quiet_run(["mount", "-o", "loop", image, mnt])
        try:
            quiet_run(["cp", "-a", f"{tree}/.", mnt])
        finally:
            unmount(mnt)
        mksquashfs(src, out, comp, epoch)

    wall, cpu, _ = best_of(repeat, job, before=remove(out, src, mnt))
    remove(src, mnt)()
    return Row("classic loop mount", comp, wall, cpu, out.stat().st_size)


# ---------------------------------------------------------------- the run


@dataclass
class Result:
    tree: str
    entries: int
    tree_bytes: int
    rootfs_bytes: int
    rows: list[Row]
    headline: dict[str, dict[str, float]]
    free_cost_zstd: dict[str, Row | None]  # None: the build failed
    load: tuple[float, float]  # 1-minute load average before and after: is the run noisy?


def measure(tree: Path, work: Path, repeat: int, exe: str) -> Result:
    load_before = load_average()
    rows: list[Row] = []
    rootfs_size = 0
    for comp in COMPRESSORS:
        built = work / f"dmoverlay-{comp}.img"
        dm = dmoverlay_build(exe, tree, built, repeat, "--compression", comp)
        dm.compression = comp
        alone, rootfs_size = mksquashfs_alone(built, work, comp, repeat)
        group = [dm, alone]
        if os.geteuid() == 0:
            group.append(classic(tree, work, comp, rootfs_size, squashfs_epoch(built), repeat))
        else:
            print(f"skipping the classic flow ({comp}): it needs root", file=sys.stderr)
        for row in group:
            row.ratio = row.seconds / alone.seconds
        rows += group
        built.unlink()
    free: dict[str, Row | None] = {}
    for amount in ("1M", "8G"):
        out = work / f"free-{amount}.img"
        try:
            free[amount] = dmoverlay_build(exe, tree, out, repeat, "--compression", "zstd",
                                           "--free", amount)
            out.unlink()
        except Failed as exc:
            print(exc, file=sys.stderr)
            free[amount] = None
    entries, data = tree_summary(tree)
    return Result(str(tree), entries, data, rootfs_size, rows, headline(rows), free,
                  (load_before, load_average()))


def headline(rows: list[Row]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for comp in COMPRESSORS:
        by_step = {r.step: r for r in rows if r.compression == comp}
        dm, alone = by_step["dmoverlay build"], by_step["mksquashfs alone"]
        out[comp] = {"vs_mksquashfs_alone": dm.seconds / alone.seconds,
                     "cpu_vs_mksquashfs_alone": dm.cpu_seconds / alone.cpu_seconds}
        if "classic loop mount" in by_step:
            out[comp]["vs_classic"] = dm.seconds / by_step["classic loop mount"].seconds
    return out


TABLE = Table((Column("step", "<32"), Column("seconds", ">9.2f"), Column("cpu s", ">9.2f"),
               Column("squashfs bytes", ">16,"), Column("vs mksquashfs", ">15.2f")))


def report(res: Result) -> None:
    print(f"tree: {res.tree_bytes / MB:.1f} MB in {res.entries} entries, copied from "
          f"{SOURCE}; rootfs.img {res.rootfs_bytes / MB:.1f} MB (sparse); "
          f"{load_text(*res.load)}")
    print(TABLE.header())
    for r in res.rows:
        print(TABLE.row(f"{r.step} ({r.compression})", r.seconds, r.cpu_seconds,
                        r.squashfs_bytes, r.ratio))
        if r.phases:
            print("    dmoverlay steps: " + ", ".join(
                f"{name} {s:.1f} s" for name, s in r.phases.items()))
    for comp, h in res.headline.items():
        line = (f"{comp}: dmoverlay / mksquashfs alone = {h['vs_mksquashfs_alone']:.3f} "
                f"(goal <= {GOAL}; in CPU time {h['cpu_vs_mksquashfs_alone']:.3f})")
        if "vs_classic" in h:
            line += f", dmoverlay / classic = {h['vs_classic']:.3f}"
        print(line)
    small, big = res.free_cost_zstd["1M"], res.free_cost_zstd["8G"]
    if small is None or big is None:
        print("cost of free space (zstd): a build failed")
        return
    grow = big.squashfs_bytes - small.squashfs_bytes
    print(f"cost of free space (zstd): --free 1M {small.squashfs_bytes:,} bytes "
          f"({small.seconds:.2f} s), --free 8G {big.squashfs_bytes:,} bytes "
          f"({big.seconds:.2f} s): {grow:+,} bytes ({100 * grow / small.squashfs_bytes:+.2f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=400, help="size of the tree to copy (MB)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per step")
    parser.add_argument("--tree", type=Path, help="keep the tree here, and reuse it next time")
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp"),
                        help="where to work (needs about 4 x --mb free)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    exe = shutil.which("dmoverlay", path=os.path.dirname(sys.executable)) or "dmoverlay"
    compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="build-bench.", dir=args.scratch))
    try:
        tree = args.tree or work / "tree"
        if tree.is_dir():
            print(f"reusing the tree in {tree}", file=sys.stderr)
        else:
            print(f"copying about {args.mb} MB of {SOURCE} to {tree}", file=sys.stderr)
            make_tree(tree, args.mb, partial=work / "partial-tree")
        result = measure(tree.resolve(), work, args.repeat, exe)
    except Failed as exc:
        raise SystemExit(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
