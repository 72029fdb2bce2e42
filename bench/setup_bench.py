"""How fast `dmoverlay setup` is against dracut's shell sequence, and how much of the
COW store an update takes, in one run, on one image made by `dmoverlay build`.

(a) Setup time, wall clock, best of --repeat (default 5), each method torn down
between runs (not timed), the methods taking turns (and turns at going first) so
that load hits them alike: `dmoverlay setup` as a process; dracut's dmsquash-live
steps as one bash script (losetup -r, mount, losetup -r, tmpfs, sparse COW file
with dd seek=, losetup, dmsetup create live-base and live-rw, mount);
`overlay.setup()` in this process.  A new process's start-up is timed on its own
(`python -c pass`, `dmoverlay --version`, then libblockdev loaded): under emulation
(qemu TCG) it is a large, fixed part of any dmoverlay command.  And the
initramfs's way (`python -I -S`, a prefix staged as `dmoverlay initramfs stage`
makes it): setup up to its first step, reading the command line (/dev/null,
refused), by `dmoverlay setup --from-cmdline` and by `dmoverlay-boot setup`, what
the dracut hooks run.
Goals: dmoverlay setup <= 1.2 x the shell sequence; the hooks' setup up to its
first step <= 60 ms on the host (`--startup-only`: those rows alone, in ms, as
any user, no device-mapper needed).

(b) COW per byte of update: on a fresh overlay, `dmoverlay status --json` used
bytes, then the update (new and replaced files, --update-mb MiB), `sync`, used
bytes again; ratio = COW delta / bytes of file data in the update.  Goal for
`dmoverlay apply` <= 1.1; `tar -x` and dracut's per-file `cp -a` loop write the
same update for comparison.

Needs root and a kernel with device-mapper; in the VM:

    scripts/vmtest --run .venv/bin/python bench/setup_bench.py [--repeat 5] [--json]

The start-up rows alone, on the host:

    PYTHONPATH=$PWD .venv/bin/python bench/setup_bench.py --startup-only --repeat 30

Everything lives on a tmpfs mounted for the run on a new directory under
--scratch, and is torn down and removed at the end, even after a failure.
Nothing here asserts a time: it prints figures for people.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import DRACUT_LOOP, Column, Failed, Table, stopwatch

from dmoverlay.boot import initramfs
from dmoverlay.core import log
from dmoverlay.core.errors import DmoverlayError
from dmoverlay.core.run import clean_env
from dmoverlay.overlay import setup as overlay
from dmoverlay.overlay.options import SetupOptions, parse_image
from dmoverlay.overlay.state import load_state
from dmoverlay.overlay.status import status
from dmoverlay.overlay.teardown import teardown

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4 * KiB
GOAL_SETUP = 1.2  # dmoverlay setup at most 1.2 x dracut's shell sequence
GOAL_COW = 1.1  # COW bytes per byte of update data, at most
GOAL_BOOT_STARTUP = 0.060  # seconds: the hooks' setup up to its first step, the initramfs's way
LIBBLOCKDEV_ROW = "+ libblockdev loop, fs"
BOOT_ROW = "-I -S: dmoverlay-boot setup, to 1st step"
SEED = 20260102
TOP = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DMOVERLAY = BIN / "dmoverlay"

# dmsquash-live-root.sh's steps for LiveOS/squashfs.img holding LiveOS/rootfs.img,
# with its default overlay: a sparse file on a tmpfs, rd.live.overlay.size MiB.
DRACUT_SETUP = r"""
set -eu
squash=$1 target=$2 work=$3 size_mib=$4 name=$5
mkdir -p "$work/squashfs" "$work/cow"
squash_loop=$(losetup -r -f --show "$squash")
mount -n -t squashfs -o ro "$squash_loop" "$work/squashfs"
base=$(losetup -r -f --show "$work/squashfs/LiveOS/rootfs.img")
mount -n -t tmpfs -o "size=$((size_mib + 1))m,mode=0700" tmpfs "$work/cow"
dd if=/dev/null of="$work/cow/overlay" bs=1024 count=1 seek=$((size_mib * 1024)) 2>/dev/null
cow=$(losetup -f --show "$work/cow/overlay")
sz=$(blockdev --getsz "$base")
dmsetup create "$name-base" --readonly --table "0 $sz linear $base 0"
dmsetup create "$name-rw" --table "0 $sz snapshot $base $cow PO 8"
mount -n -t ext4 "/dev/mapper/$name-rw" "$target"
"""


def say(message: str) -> None:
    print(f"setup_bench: {message}", file=sys.stderr, flush=True)


# Set in main(): compiled bytecode for the Python processes run here.  The VM's root
# is read-only, so without it every `dmoverlay` would compile its modules anew
# whenever the checkout's __pycache__ is stale; an installed system has them.
PYCACHE: dict[str, str] = {}


def run(argv: Sequence[str | os.PathLike[str]]) -> str:
    """Runs a command; its stdout is returned, its stderr shown when it fails."""
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(args, env=clean_env(PYCACHE), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise Failed(f"exit {proc.returncode}: {shlex.join(args)}")
    return proc.stdout


def timed(action: Callable[[], object]) -> float:
    with stopwatch() as lap:
        action()
    return lap.wall


# ---------------------------------------------------------------- the data


@dataclass(frozen=True)
class File:
    path: str
    size: int
    old_size: int = 0  # > 0: an older version is in the image


def plan_update(rng: random.Random, budget: int) -> list[File]:
    """About `budget` bytes: half in four large files, a quarter in medium (64-512
    KiB) and a quarter in small (1-32 KiB) ones; about half of each kind replaces
    an older version in the image, the rest is new."""
    files = [File(f"usr/lib/firmware/bench/blob{i}.bin", budget // 8,
                  budget // 10 if i % 2 == 0 else 0) for i in range(4)]
    for kind, low, high, where in (("medium", 64 * KiB, 512 * KiB, "usr/lib/x86_64-linux-gnu"),
                                   ("small", KiB, 32 * KiB, "usr/share/bench")):
        left, i = budget // 4, 0
        while left > 0:
            size = min(left, rng.randint(low, high))
            replace = i % 2 == 0
            folder = where if replace else f"{where}/new-{kind}"
            name = f"lib{kind}{i}.so.1" if kind == "medium" else f"{kind}{i}.dat"
            files.append(File(f"{folder}/{name}", size,
                              rng.randint(low, high) if replace else 0))
            left -= size
            i += 1
    return files


def write(path: Path, size: int, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, MiB)
            f.write(os.urandom(chunk))  # incompressible: what the COW holds is not compressed
            left -= chunk
    os.chmod(path, mode)


def make_tree(root: Path, files: list[File], *, rng: random.Random, filler: int) -> None:
    """Merged /usr; the older versions of the update's files; `filler` more bytes."""
    for link, to in (("lib", "usr/lib"), ("bin", "usr/bin"), ("sbin", "usr/sbin")):
        os.symlink(to, root / link)
    for sub in ("usr/bin", "usr/sbin", "etc", "var/log", "tmp", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text("NAME=Bench\nID=bench\n")
    for f in files:
        if f.old_size:
            write(root / f.path, f.old_size)
    i = 0
    while filler > 0:
        size = min(filler, rng.randint(4 * KiB, 256 * KiB))
        write(root / f"usr/share/filler/{i // 100}/file{i}", size)
        filler -= size
        i += 1


@dataclass(frozen=True)
class Update:
    directory: Path
    tar: Path
    cpio_gz: Path
    files: int
    data_bytes: int  # file contents
    block_bytes: int  # the same, each file rounded up to whole 4 KiB blocks


def make_update(top: Path, files: list[File]) -> Update:
    directory = top / "update"
    for f in files:
        write(directory / f.path, f.size)
    tar, cpio_gz = top / "update.tar", top / "update.cpio.gz"
    run(["tar", "-cf", tar, "-C", directory, "."])
    # anaconda's updates.img: find . | cpio -c -o | gzip -9 (-1 here: the data is
    # random, and the level changes nothing in what is written to the root)
    subprocess.run(["bash", "-c", 'cd "$1" && find . | cpio --quiet -o -H newc | gzip -1 > "$2"',
                    "bash", directory, cpio_gz], check=True, env=clean_env())
    data = sum(f.size for f in files)
    blocks = sum(-(-f.size // BLOCK) * BLOCK for f in files)
    return Update(directory, tar, cpio_gz, len(files), data, blocks)


# ---------------------------------------------------------------- the kernel


def attached() -> tuple[list[str], list[str], list[str]]:
    """Loop devices in use, device-mapper devices, mounts: what teardown must give back."""
    loops = sorted(p.parent.parent.name for p in Path("/sys/block").glob("loop*/loop/backing_file"))
    dms = sorted(line for line in run(["dmsetup", "ls"]).splitlines()
                 if line and not line.startswith("No devices"))
    mounts = sorted(line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines())
    return loops, dms, mounts


def loops_of(prefix: Path) -> list[str]:
    """Loop devices whose backing file is under prefix (or is it)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        name = backing.read_text().strip().removesuffix(" (deleted)")
        if name == os.fspath(prefix) or name.startswith(os.fspath(prefix) + "/"):
            found.append(f"/dev/{backing.parent.parent.name}")
    return found


@dataclass(frozen=True)
class Place:
    """Where one overlay is made: the image, its mount point, the work files."""

    image: Path
    target: Path
    work: Path  # dmoverlay's --state-dir, or the shell sequence's work directory
    name: str
    size: int

    def options(self) -> SetupOptions:
        return SetupOptions(image=parse_image(os.fspath(self.image)), target=self.target,
                            name=self.name, overlay_size=self.size, state_dir=self.work)


def cli_setup(p: Place) -> None:
    run([DMOVERLAY, "-q", "setup", p.image, "--target", p.target, "--name", p.name,
         "--overlay-size", str(p.size), "--state-dir", p.work])


def lib_setup(p: Place) -> None:
    overlay.setup(p.options())


def lib_teardown(p: Place) -> None:
    teardown(p.work, p.name)


def shell_setup(p: Place) -> None:
    run(["bash", "-c", DRACUT_SETUP, "bash", p.image, p.target, p.work,
         str(p.size // MiB), p.name])


def shell_teardown(p: Place) -> None:
    """Undoes the shell sequence, newest first; also what a failed run left."""
    if os.path.ismount(p.target):
        run(["umount", p.target])
    for dm in (f"{p.name}-rw", f"{p.name}-base"):
        if subprocess.run(["dmsetup", "info", dm], capture_output=True,
                          check=False).returncode == 0:
            run(["dmsetup", "remove", dm])
    for sub in ("cow", "squashfs"):
        for dev in loops_of(p.work / sub):
            run(["losetup", "-d", dev])
        if os.path.ismount(p.work / sub):
            run(["umount", p.work / sub])
    for dev in loops_of(p.image):
        run(["losetup", "-d", dev])
    shutil.rmtree(p.work, ignore_errors=True)


METHODS: dict[str, tuple[Callable[[Place], None], Callable[[Place], None]]] = {
    "dmoverlay setup (process)": (cli_setup, lib_teardown),
    "dracut shell sequence (bash)": (shell_setup, shell_teardown),
    "overlay.setup() in-process": (lib_setup, lib_teardown),
}


@contextmanager
def overlay_at(p: Place, setup: Callable[[Place], None],
               teardown: Callable[[Place], None]) -> Iterator[None]:
    """An overlay set up by `setup`; torn down by `teardown` (even after a failure),
    which must give back every loop, dm device and mount."""
    before = attached()
    try:
        setup(p)
        if not os.path.ismount(p.target):
            raise Failed(f"{p.target} is not mounted after setup")
        yield
    except BaseException:
        teardown(p)
        raise
    teardown(p)
    if attached() != before:
        raise Failed(f"teardown left something attached: {attached()} vs {before}")


@contextmanager
def scratch_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="setup-bench-", dir=parent))
    try:
        run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "setup-bench", top])
        try:
            yield top
        finally:
            for p in sorted(loops_of(top)):  # a failed run: whatever it left
                subprocess.run(["losetup", "-d", p], check=False)
            subprocess.run(["umount", top], check=False)
    finally:
        with suppress(OSError):
            top.rmdir()


# ---------------------------------------------------------------- (a) time


@dataclass
class Row:
    method: str
    seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)


def time_one(p: Place, setup: Callable[[Place], None],
             teardown: Callable[[Place], None]) -> float:
    seconds = 0.0

    def timed_setup(q: Place) -> None:
        nonlocal seconds
        seconds = timed(lambda: setup(q))

    with overlay_at(p, timed_setup, teardown):
        pass
    return seconds


def time_setups(top: Path, image: Path, repeat: int, size: int) -> list[Row]:
    rows = [Row(m) for m in METHODS]
    target = top / "sysroot"
    target.mkdir()
    place = Place(image, target, top / "work", f"setupbench{os.getpid()}", size)
    for n in range(repeat):
        for row in rows[n % len(rows):] + rows[:n % len(rows)]:  # each goes first in turn
            row.seconds.append(time_one(place, *METHODS[row.method]))
        say(f"setup round {n + 1}/{repeat}: "
            + ", ".join(f"{r.method} {r.seconds[-1]:.2f} s" for r in rows))
    return rows


# What a `dmoverlay setup` process does before its first step: the interpreter, the
# command line's imports, libblockdev with the plugins setup uses.
STARTUP = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "dmoverlay --version": [os.fspath(DMOVERLAY), "--version"],
    LIBBLOCKDEV_ROW: [sys.executable, "-c", "import dmoverlay.cli; from "
                      "dmoverlay.overlay import libblockdev; libblockdev.load('loop', 'fs')"],
}
# The initramfs's way (python -I -S, the staged zip of bytecode): setup up to its
# first step, reading the command line, which /dev/null fails (exit 1), by the
# full command line and by dmoverlay-boot, which the dracut hooks run.
BOOT_STARTUP = {
    "-I -S: python -c pass": ["-c", "pass"],
    "-I -S: dmoverlay setup, to 1st step": ["-c", "from dmoverlay.cli import main; main()",
                                             "setup", "--from-cmdline", "/dev/null",
                                             "--target", "{target}"],
    BOOT_ROW: ["-c", "from dmoverlay.boot.hooks import main; main()",
               "setup", "/dev/null", "{target}"],
}


def staged_python(top: Path) -> Path:
    """A prefix under `top` holding what the initramfs holds of Python: the
    interpreter, the staged zip, the extension modules; its interpreter."""
    closure = initramfs.stage(top)
    python = top / closure.python.lstrip("/")
    shutil.copy2(closure.python, python)
    for extension in closure.extensions:
        dest = top / extension.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(extension, dest)
    return python


def startup_commands(top: Path) -> dict[str, list[str]]:
    """STARTUP, and BOOT_STARTUP with the staged interpreter (under `top`)."""
    python = os.fspath(staged_python(top))
    target = top / "target"
    target.mkdir()
    boot = {name: [python, "-I", "-S", *(a.format(target=target) for a in args)]
            for name, args in BOOT_STARTUP.items()}
    return {**STARTUP, **boot}


def run_to_first_step(argv: list[str]) -> None:
    """Runs a start-up command (the checkout PYTHONPATH names, if any, for
    the venv's rows: -I ignores it): one that stops at setup's first step
    must end there, refusing /dev/null as a command line (exit 1)."""
    env = clean_env({**PYCACHE, "DMOVERLAY_BLOCKDEV": "util-linux"})
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    stops = "/dev/null" in argv
    if (proc.returncode, stops) != (1 if stops else 0, stops) or (
            stops and not proc.stderr.startswith("error: kernel command line: ")):
        sys.stderr.write(proc.stderr)
        raise Failed(f"exit {proc.returncode}: {shlex.join(argv)}")


def time_startup(commands: dict[str, list[str]], repeat: int) -> list[Row]:
    rows = [Row(name) for name in commands]
    for _ in range(repeat):
        for row in rows:
            with stopwatch() as lap:
                run_to_first_step(commands[row.method])
            row.seconds.append(lap.wall)
    return rows


# ---------------------------------------------------------------- (b) COW


@dataclass
class CowRow:
    method: str
    used_before: int = 0
    used_after_sync: int = 0
    used_after_umount: int = 0
    ram_before: int = 0  # tmpfs pages of the COW file
    ram_after: int = 0
    seconds: float = 0.0

    @property
    def delta(self) -> int:
        return self.used_after_sync - self.used_before


def cow_used(p: Place) -> int:
    """`dmoverlay status --json`'s used bytes."""
    out = run([DMOVERLAY, "status", "--json", "--name", p.name, "--state-dir", p.work])
    used: int = json.loads(out)["used"]
    return used


def cow_ram(p: Place) -> int:
    state, _ = load_state(p.work, p.name)
    return os.stat(state.cow_file).st_blocks * 512


def measure_cow(top: Path, image: Path, update: Update, size: int) -> list[CowRow]:
    target, run_dir = top / "sysroot", top / "run"
    run_dir.mkdir(exist_ok=True)
    writers: dict[str, Callable[[], object]] = {
        "dmoverlay apply (updates.cpio.gz)": lambda: run(
            [DMOVERLAY, "-q", "apply", update.cpio_gz, "--root", target, "--run-dir", run_dir]),
        "tar -x": lambda: run(["tar", "-xf", update.tar, "-C", target,
                               "--keep-directory-symlink"]),
        "dracut loop (per-file cp -a)": lambda: run(
            ["bash", "-c", DRACUT_LOOP, "bash", update.directory, target]),
    }
    rows = []
    place = Place(image, target, top / "work", f"cowbench{os.getpid()}", size)
    for method, write_update in writers.items():
        row = CowRow(method)
        with overlay_at(place, lib_setup, lib_teardown):
            os.sync()
            row.used_before, row.ram_before = cow_used(place), cow_ram(place)
            row.seconds = timed(write_update)
            os.sync()
            row.used_after_sync, row.ram_after = cow_used(place), cow_ram(place)
            check_written(target, update)
            # what is still to come from the journal's checkpoint and the unmount
            run(["umount", target])
            row.used_after_umount = status(place.work, place.name).used
        say(f"COW: {method}: {row.delta / MiB:.2f} MiB for {update.data_bytes / MiB:.2f} MiB")
        rows.append(row)
    return rows


def check_written(root: Path, update: Update) -> None:
    """Every file of the update is in the root, whole (sizes; bytes of every 20th)."""
    for i, path in enumerate(sorted(p for p in update.directory.rglob("*") if p.is_file())):
        there = root / path.relative_to(update.directory)
        if there.stat().st_size != path.stat().st_size or (
                i % 20 == 0 and there.read_bytes() != path.read_bytes()):
            raise Failed(f"{there} is not what the update holds")


# ---------------------------------------------------------------- the run


@dataclass
class Results:
    machine: dict[str, str]
    tree_bytes: int
    squashfs_bytes: int
    build_seconds: float
    overlay_bytes: int
    update_files: int
    update_replaced: int
    update_data_bytes: int
    update_block_bytes: int
    setup: list[Row]
    startup: list[Row]
    cow: list[CowRow]

    @property
    def ratios(self) -> dict[str, float]:
        cli, shell, lib = (r.best for r in self.setup)
        startup = next(r.best for r in self.startup if r.method == LIBBLOCKDEV_ROW)
        ratios = {"setup: dmoverlay process / shell": cli / shell,
                  "setup: overlay.setup() in-process / shell": lib / shell,
                  "setup: (process - its start-up) / shell": (cli - startup) / shell}
        for row in self.cow:
            ratios[f"COW per byte: {row.method}"] = row.delta / self.update_data_bytes
        ratios["COW: dmoverlay apply / tar -x"] = self.cow[0].delta / self.cow[1].delta
        ratios["COW: dmoverlay apply / whole 4 KiB blocks of the data"] = (
            self.cow[0].delta / self.update_block_bytes)
        return ratios

    @property
    def goals_met(self) -> dict[str, bool]:
        cli, shell, _ = (r.best for r in self.setup)
        return {f"dmoverlay setup <= {GOAL_SETUP} x the shell sequence": cli / shell <= GOAL_SETUP,
                f"COW per byte of update (dmoverlay apply) <= {GOAL_COW}":
                    self.cow[0].delta / self.update_data_bytes <= GOAL_COW,
                **boot_startup_goal(self.startup)}

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self),
                "setup": [{**asdict(r), "best": r.best} for r in self.setup],
                "startup": [{**asdict(r), "best": r.best} for r in self.startup],
                "cow": [{**asdict(r), "delta": r.delta} for r in self.cow],
                "ratios": self.ratios, "goals_met": self.goals_met}


def boot_startup_goal(rows: list[Row]) -> dict[str, bool]:
    best = next(r.best for r in rows if r.method == BOOT_ROW)
    return {f"the hooks' setup to its first step <= {GOAL_BOOT_STARTUP * 1000:.0f} ms "
            "(the initramfs's way; on the host, not under TCG)": best <= GOAL_BOOT_STARTUP}


def machine() -> dict[str, str]:
    return {"kernel": platform.release(), "python": platform.python_version(),
            "cpus": str(os.cpu_count()), "in_vm": os.environ.get("DMOVERLAY_VMTEST", "no"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def bench(opts: argparse.Namespace, top: Path) -> Results:
    rng = random.Random(SEED)
    files = plan_update(rng, opts.update_mb * MiB)
    tree, image = top / "tree", top / "squashfs.img"
    tree.mkdir()
    make_tree(tree, files, rng=rng, filler=opts.tree_mb * MiB)
    tree_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    build_s = timed(lambda: run([DMOVERLAY, "-q", "build", tree, "-o", image, "--free",
                                 "256M", "--compression", "zstd"]))
    shutil.rmtree(tree)  # the image holds it; RAM is short in the VM
    say(f"image: {tree_bytes / MiB:.1f} MiB tree, squashfs.img "
        f"{image.stat().st_size / MiB:.1f} MiB, built in {build_s:.1f} s")
    update = make_update(top, files)
    size = opts.overlay_mb * MiB
    setup_rows = time_setups(top, image, opts.repeat, size)
    (top / "prefix").mkdir()
    startup_rows = time_startup(startup_commands(top / "prefix"), opts.repeat)
    cow_rows = measure_cow(top, image, update, size)
    return Results(machine(), tree_bytes, image.stat().st_size, build_s, size, update.files,
                   sum(1 for f in files if f.old_size), update.data_bytes, update.block_bytes,
                   setup_rows, startup_rows, cow_rows)


# (a): a method's best time (each run's follow it, outside the columns)
SECONDS = Table((Column("method", "<32"), Column("best", ">7.2f")), indent="  ")
COW = Table((Column("method", "<36"), Column("COW delta", ">10.2f", "M"),
             Column("per byte", ">9.3f"), Column("umount", ">+8.0f", "K"),
             Column("RAM", ">9.2f", "M"), Column("seconds", ">9.1f")), indent="  ")
RATIOS = Table((Column("ratio", "<56"), Column("value", ">7.3f")), indent="  ")


def seconds_line(row: Row) -> str:
    return SECONDS.row(row.method, row.best) + f"   [{' '.join(f'{s:.2f}' for s in row.seconds)}]"


def report(r: Results) -> None:
    m = r.machine
    print(f"kernel {m['kernel']}, Python {m['python']}, {m['cpus']} CPUs, "
          f"in vm: {m['in_vm']}, load {m['load']}")
    print(f"image: {r.tree_bytes / MiB:.1f} MiB tree, squashfs.img {r.squashfs_bytes / MiB:.1f} "
          f"MiB (dmoverlay build, zstd, {r.build_seconds:.1f} s); overlay "
          f"{r.overlay_bytes // MiB} MiB")
    print("\n(a) setup, wall seconds: best, then every run")
    for row in r.setup:
        print(seconds_line(row))
    print("  start-up of a new process:")
    for row in r.startup:
        print(seconds_line(row))
    if m["in_vm"] == "vm":
        print("  (qemu TCG emulates every instruction: process start-up and Python imports are "
              "tens of times\n  slower than on hardware, and weigh far more here than at boot)")
    print(f"\n(b) COW taken by one update: {r.update_files} files ({r.update_replaced} "
          f"replacing older ones), {r.update_data_bytes / MiB:.2f} MiB of data, "
          f"{r.update_block_bytes / MiB:.2f} MiB in whole 4 KiB blocks "
          f"(ratio {r.update_block_bytes / r.update_data_bytes:.3f})")
    print(COW.header())
    for c in r.cow:
        late = c.used_after_umount - c.used_after_sync
        print(COW.row(c.method, c.delta / MiB, c.delta / r.update_data_bytes, late / KiB,
                      (c.ram_after - c.ram_before) / MiB, c.seconds))
    print("  (COW delta: `dmoverlay status` used bytes after sync minus before; umount: what "
          "came on unmounting; RAM: tmpfs pages of the COW file)")
    print("\nratios")
    for name, value in r.ratios.items():
        print(RATIOS.row(name, value))
    for goal, met in r.goals_met.items():
        print(f"goal: {goal}: {'met' if met else 'NOT met'}")


def startup_only(opts: argparse.Namespace) -> int:
    """--startup-only: the start-up rows alone, in ms (no root or device-mapper needed)."""
    try:
        with tempfile.TemporaryDirectory(prefix="setup-bench-") as top:
            rows = time_startup(startup_commands(Path(top)), opts.repeat)
    except (Failed, DmoverlayError) as exc:
        say(f"FAILED: {exc}")
        return 1
    goals = boot_startup_goal(rows)
    if opts.json:
        print(json.dumps({"machine": machine(), "repeat": opts.repeat,
                          "startup": [{**asdict(r), "best": r.best} for r in rows],
                          "goals_met": goals}, indent=2))
        return 0
    m = machine()
    print(f"kernel {m['kernel']}, Python {m['python']}, {m['cpus']} CPUs, load {m['load']}")
    print(f"start-up of a new process, ms: best and median of {opts.repeat}")
    for row in rows:
        print(f"  {row.method:<40} {row.best * 1000:7.1f} "
              f"{statistics.median(row.seconds) * 1000:7.1f}")
    for goal, met in goals.items():
        print(f"goal: {goal}: {'met' if met else 'NOT met'}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each setup (best of)")
    parser.add_argument("--tree-mb", type=int, default=24, help="filler in the image's tree")
    parser.add_argument("--update-mb", type=int, default=32, help="file data in the update")
    parser.add_argument("--overlay-mb", type=int, default=256, help="COW store size")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp"),
                        help="where the run's tmpfs is mounted (on a new directory)")
    parser.add_argument("--json", action="store_true", help="results as JSON on stdout")
    parser.add_argument("--startup-only", action="store_true",
                        help="only the start-up rows, in ms (any user, no device-mapper): "
                             "e.g. --startup-only --repeat 30 on the host")
    opts = parser.parse_args(argv)
    if opts.startup_only:
        return startup_only(opts)
    if os.geteuid() != 0:
        say("needs root and device-mapper: scripts/vmtest --run .venv/bin/python "
            "bench/setup_bench.py")
        return 2
    log.quiet = True
    try:
        with scratch_tmpfs(opts.scratch, "1200m") as top:
            PYCACHE["PYTHONPYCACHEPREFIX"] = os.fspath(top / "pycache")
            results = bench(opts, top)
    except (Failed, DmoverlayError) as exc:
        say(f"FAILED: {exc}")
        return 1
    if opts.json:
        print(json.dumps(results.to_dict(), indent=2))
    else:
        report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
