"""How fast `dmoverlay apply` is, against dracut's per-file loop and GNU tar, in one run.

The update (`--shape large`, the default): `--files` small files (1-8 KiB, text
and binary) in a few hundred directories under lib/, lib64/, bin/, sbin/, usr/share/ and etc/, a few
hundred new .so links, and four large files (20-50 MiB); or (`--shape small`:
many files, little data) files of 64-512 bytes, 100 to a directory, and four
files of 8 MiB (32 MiB in all).  Either is written once as a
directory, a tar and a gzip'd newc cpio (anaconda's updates.img).  The root:
merged /usr (lib -> usr/lib, bin -> usr/bin, ...) holding about half of the
update's files in older versions, so both creating and replacing are timed.
Everything lives on a tmpfs mounted for the run (as the initramfs has it), and
every timed run starts from a fresh `cp -a` of the root (not timed).  Each
result is checked against the expected tree (every entry's kind, mode, owner,
size and mtime; the bytes of every 10th file), so no run can cheat.

Timed: dracut's loop from apply-live-updates.sh (run with bash), `tar -xf
--keep-directory-symlink`, `dmoverlay apply` as a user runs it (from each
input), and the library's read_all + apply_members in a new process and in
this one, to show what process start-up costs.  Wall time is what the goals
are about; CPU time is printed too, as it suffers less from other load.  When
a goal is missed (or with --profile), the in-process apply is timed by part
and profiled.  Nothing here asserts a time: it prints figures for people.

    sudo .venv/bin/python bench/apply_bench.py [--files 10000] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from common import (
    DRACUT_LOOP,
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

from dmoverlay.apply.execute import ApplyOptions, Spool, apply_members, read_all, staging
from dmoverlay.apply.journal import JOURNALS
from dmoverlay.apply.readers import open_update
from dmoverlay.core import log
from dmoverlay.core.run import clean_env

KiB = 1024
MiB = 1024 * KiB
GOAL_VS_DRACUT = 20.0  # dmoverlay at least 20 x faster than dracut's loop
GOAL_VS_TAR = 1.5  # dmoverlay at most 1.5 x the time of tar --keep-directory-symlink
SEED = 20260101
NEW_MTIME = 1_750_000_000  # whole seconds: tar and cpio keep no more
OLD_MTIME = 1_700_000_000
ROOT_DIRS = ("dev", "etc", "home", "proc", "root", "run", "sys", "tmp", "var",
             "usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/share")


@dataclass(frozen=True)
class Shape:
    """How the update is made up: small files per directory, their sizes
    (bytes, least and most), and the large files (MiB each)."""

    per_dir: int
    small: tuple[int, int]
    large_mib: tuple[int, ...]


SHAPES = {"large": Shape(30, (KiB, 8 * KiB), (20, 30, 40, 50)),
          "small": Shape(100, (64, 512), (8, 8, 8, 8))}
SAMPLE_EVERY = 10  # contents compared for every 10th small file, and every large one

# (directory pattern, file name stem, suffix, share of binary files, mode)
TEMPLATES: tuple[tuple[str, str, str, float, int], ...] = (
    ("lib/modules/6.1.0-bench/kernel/drivers/{a}/{b}", "drv", ".ko", 1.0, 0o644),
    ("lib/x86_64-linux-gnu/{a}", "libbench", ".so.1", 1.0, 0o644),
    ("lib/python3/dist-packages/{a}/{b}", "mod", ".py", 0.0, 0o644),
    ("lib64/{a}", "ld", ".so", 1.0, 0o644),
    ("bin", "tool", "", 1.0, 0o755),
    ("sbin", "daemon", "", 1.0, 0o755),
    ("usr/share/doc/{a}", "README", ".txt", 0.0, 0o644),
    ("usr/share/locale/{a}/LC_MESSAGES", "domain", ".mo", 1.0, 0o644),
    ("usr/share/{a}/{b}", "data", ".dat", 0.5, 0o644),
    ("etc/{a}", "conf", ".conf", 0.0, 0o644),
    ("etc/{a}/{b}.d", "drop", ".conf", 0.0, 0o644),
)


# ---------------------------------------------------------------- the data


@dataclass(frozen=True)
class Spec:
    """One file of the update, by the name the update spells it."""

    name: str
    size: int
    binary: float  # chance that a piece of it is binary
    mode: int
    old_size: int = 0  # > 0: an older version is in the root


@dataclass
class Content:
    """Deterministic file contents: text from a made-up corpus, binary as
    random bytes with runs of zeros, as compiled files have."""

    rng: random.Random
    corpus: bytes = b""

    def __post_init__(self) -> None:
        words = ["".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz_", k=self.rng.randint(2, 10)))
                 for _ in range(3000)]
        lines: list[str] = []
        size = 0
        while size < 2 * MiB:
            line = " " * 4 * self.rng.randint(0, 3) + " ".join(
                self.rng.choices(words, k=self.rng.randint(2, 12)))
            lines.append(line)
            size += len(line) + 1
        self.corpus = ("\n".join(lines) + "\n").encode()

    def text(self, size: int) -> bytes:
        start = self.rng.randrange(len(self.corpus) - size)
        return self.corpus[start:start + size]

    def make(self, size: int, binary: float, piece: int = 512) -> bytes:
        parts = []
        for _ in range(-(-size // piece)):
            roll = self.rng.random()
            if roll >= binary:
                parts.append(self.text(piece))
            elif roll < binary * 0.3:
                parts.append(bytes(piece))
            else:
                parts.append(self.rng.randbytes(piece))
        return b"".join(parts)[:size]


def live_path(name: str) -> str:
    """Where an update's name lands in the root, through the merged-/usr links."""
    top, sep, rest = name.partition("/")
    return ROOT_LINKS.get(top, top) + sep + rest


def directories(files: int, shape: Shape) -> list[tuple[str, int]]:
    """The update's directories, each with the index of its template."""
    found: dict[str, int] = {}
    for i in range(max(len(TEMPLATES), files // shape.per_dir)):
        t = i % len(TEMPLATES)
        n = i // len(TEMPLATES)
        path = TEMPLATES[t][0].format(a=f"pkg{n // 3:02d}", b=f"part{n % 3}")
        found.setdefault(path, t)
    return sorted(found.items())


def plan_files(files: int, rng: random.Random, shape: Shape) -> tuple[list[Spec], set[str]]:
    """The update's files (small, then large) and the directories the root
    already has (by update name)."""
    dirs = directories(files, shape)
    existing = {d for d, _ in dirs if rng.random() < 0.8}
    existing |= {p for d in existing for p in ancestors(d)}
    small = []
    for j in range(files):
        path, t = rng.choice(dirs)
        _, stem, suffix, binary, mode = TEMPLATES[t]
        small.append(Spec(f"{path}/{stem}{j:05d}{suffix}", rng.randint(*shape.small), binary,
                          mode))
    candidates = [i for i, s in enumerate(small) if s.name.rpartition("/")[0] in existing]
    for i in rng.sample(candidates, min(len(candidates), files // 2)):
        small[i] = replace(small[i], old_size=rng.randint(*shape.small))
    large = [Spec(f"lib/firmware/bench/blob{i}.bin", mib * MiB, 0.7, 0o644,
                  old_size=(mib - 2) * MiB if i % 2 == 0 else 0)
             for i, mib in enumerate(shape.large_mib)]
    existing |= {"lib/firmware/bench", "lib/firmware"}
    return small + large, existing


def ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def symlinks(specs: Sequence[Spec]) -> dict[str, str]:
    """New development links, libfoo.so -> libfoo.so.1, for every fifth library."""
    return {s.name.removesuffix(".1"): s.name.rpartition("/")[2]
            for i, s in enumerate(specs) if s.name.endswith(".so.1") and i % 5 == 0}


def write_file(path: Path, data: bytes, mode: int, mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def make_data(update: Path, root: Path, files: int, shape: Shape) -> dict[str, int]:
    """Write the update tree and the root it applies to; a summary."""
    rng = random.Random(SEED)
    content = Content(rng)
    specs, existing = plan_files(files, rng, shape)
    for name in ROOT_DIRS:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, target in ROOT_LINKS.items():
        os.symlink(target, root / name)
    for d in existing:
        (root / live_path(d)).mkdir(parents=True, exist_ok=True)
    total = 0
    for s in specs:
        piece = MiB if s.size > MiB else 512
        write_file(update / s.name, content.make(s.size, s.binary, piece), s.mode, NEW_MTIME)
        total += s.size
        if s.old_size:
            write_file(root / live_path(s.name), content.make(s.old_size, s.binary, piece),
                       s.mode, OLD_MTIME)
    links = symlinks(specs)
    for name, target in links.items():
        os.symlink(target, update / name)
        os.utime(update / name, (NEW_MTIME, NEW_MTIME), follow_symlinks=False)
    for i, d in enumerate(sorted(existing)):  # files no update touches: they must stay
        if i % 10 == 0:
            write_file(root / live_path(d) / "untouched.txt", content.text(2 * KiB), 0o644,
                       OLD_MTIME)
    for top, dirs, _ in os.walk(update, topdown=False):
        for d in dirs:
            os.utime(Path(top) / d, (NEW_MTIME, NEW_MTIME))
    return {"small_files": files, "small_least": shape.small[0], "small_most": shape.small[1],
            "large_files": len(shape.large_mib), "large_mib": sum(shape.large_mib),
            "symlinks": len(links),
            "directories": sum(len(d) for _, d, _ in os.walk(update)),
            "replaced": sum(1 for s in specs if s.old_size), "update_bytes": total}


def make_archives(update: Path, work: Path) -> tuple[Path, Path]:
    tar = work / "update.tar"
    quiet_run(["tar", "-cf", tar, "-C", update, "."])
    cpio = work / "update.cpio.gz"
    # anaconda: find . | cpio -c -o | pigz -9 (GNU cpio's -c is newc)
    with open(cpio, "wb") as out:
        proc = subprocess.run("find . | cpio -o -H newc --quiet | gzip -9", shell=True,
                              cwd=update, stdout=out, stderr=subprocess.PIPE, text=True,
                              env=clean_env())
    if proc.returncode != 0 or proc.stderr:
        raise Failed(f"making the cpio archive failed: {proc.stderr.strip()}")
    return tar, cpio


# ---------------------------------------------------------------- checking

Entry = tuple[str | int, ...]


def manifest(root: Path) -> dict[str, Entry]:
    """Every entry below `root` but dmoverlay's journal: kind, mode, owner,
    size and mtime of files, the text of links, the mode of directories."""
    found: dict[str, Entry] = {}

    def walk(rel: str) -> None:
        with os.scandir(root / rel) as it:
            for e in it:
                name = f"{rel}/{e.name}" if rel else e.name
                if name == JOURNALS.split("/")[0]:
                    continue
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    found[name] = ("dir", stat.S_IMODE(st.st_mode))
                    walk(name)
                elif stat.S_ISLNK(st.st_mode):
                    found[name] = ("link", os.readlink(e.path))
                else:
                    found[name] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                   st.st_size, st.st_mtime_ns)

    walk("")
    return found


def expected_manifest(pristine: dict[str, Entry], update: dict[str, Entry]) -> dict[str, Entry]:
    want = dict(pristine)
    for name, entry in update.items():
        where = live_path(name)
        if entry[0] != "dir" or where not in want:
            want[where] = entry
    return want


def verify(root: Path, update: Path, want: dict[str, Entry], sample: Sequence[str],
           *, journal: bool) -> None:
    """The result must be the expected tree, entry by entry, with the same
    bytes in a sample of files; dmoverlay must have kept its journal."""
    got = manifest(root)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()), key=lambda kv: kv[0])[:6]
        raise Failed(f"{root}: not the expected tree ({len(set(got) ^ set(want))} names "
                     f"differ); e.g. {diff}")
    for name in sample:
        if (root / live_path(name)).read_bytes() != (update / name).read_bytes():
            raise Failed(f"{root}: {live_path(name)} differs from the update's {name}")
    if journal:
        logs = list((root / JOURNALS).glob("*/log"))
        if len(logs) != 1 or '"done"' not in logs[0].read_text().splitlines()[-1]:
            raise Failed(f"{root}: no finished journal under {JOURNALS}")


# --------------------------------------------------------------- measuring


@dataclass
class Row:
    step: str
    input: str
    seconds: float
    cpu_seconds: float  # user + system, the children's included
    speedup_vs_dracut: float = 0.0  # dracut loop seconds / these
    vs_tar: float = 0.0  # these seconds / tar's
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    """The scratch tmpfs and what lives there."""

    top: Path
    update: Path
    tar: Path
    cpio: Path
    pristine: Path
    run_dir: Path
    exe: str
    want: dict[str, Entry]
    sample: list[str]

    def fresh_root(self) -> Path:
        root = self.top / "root"
        if root.exists():
            shutil.rmtree(root)
        quiet_run(["cp", "-a", self.pristine, root])
        return root

    def path_of(self, kind: str) -> Path:
        return {"directory": self.update, "tar": self.tar, "cpio.gz": self.cpio}[kind]


def timed(bench: Bench, repeat: int, job: Callable[[Path], dict[str, float]], *,
          journal: bool = False) -> tuple[float, float, dict[str, float]]:
    """Best wall time of `repeat` runs of `job` on a fresh root, each result
    checked; the least CPU time of those runs (less sensitive to other load on
    the machine), and the phases `job` reported in its fastest run."""
    best, best_cpu, best_phases = float("inf"), float("inf"), {}
    for _ in range(repeat):
        root = bench.fresh_root()
        gc.collect()
        with stopwatch() as lap:
            phases = job(root)
        best_cpu = min(best_cpu, lap.cpu)
        verify(root, bench.update, bench.want, bench.sample, journal=journal)
        if lap.wall < best:
            best, best_phases = lap.wall, phases
    return best, best_cpu, best_phases


def dracut_loop(bench: Bench) -> Callable[[Path], dict[str, float]]:
    def job(root: Path) -> dict[str, float]:
        err = quiet_run(["bash", "-c", DRACUT_LOOP, "bash", bench.update, root])
        if err:  # find ignores what its -exec commands fail with: they say so here
            raise Failed(f"dracut's loop: {err.strip()[:500]}")
        return {}
    return job


def tar_extract(bench: Bench) -> Callable[[Path], dict[str, float]]:
    def job(root: Path) -> dict[str, float]:
        quiet_run(["tar", "-xf", bench.tar, "-C", root, "--keep-directory-symlink"])
        return {}
    return job


def dmoverlay_cli(bench: Bench, kind: str, *extra: str) -> Callable[[Path], dict[str, float]]:
    def job(root: Path) -> dict[str, float]:
        err = quiet_run([bench.exe, "apply", bench.path_of(kind), "--root", root,
                         "--run-dir", bench.run_dir, *extra], env=dict(os.environ))
        return cli_phases(err)
    return job


def dmoverlay_cli_one_process(bench: Bench, kind: str) -> Callable[[Path], dict[str, float]]:
    return dmoverlay_cli(bench, kind, "--jobs", "1")


def rollback_seconds(bench: Bench, repeat: int) -> float:
    """`dmoverlay rollback` of the tar's apply, best of `repeat`; the root
    must come back as it was."""
    before = manifest(bench.pristine)
    best = float("inf")
    for _ in range(repeat):
        root = bench.fresh_root()
        quiet_run([bench.exe, "apply", bench.tar, "--root", root, "--run-dir", bench.run_dir],
                  env=dict(os.environ))
        with stopwatch() as lap:
            quiet_run([bench.exe, "rollback", "--root", root, "--run-dir", bench.run_dir],
                      env=dict(os.environ))
        best = min(best, lap.wall)
        if manifest(root) != before:
            raise Failed(f"{root}: rollback did not bring back the root as it was")
    return best


def cli_phases(progress: str) -> dict[str, float]:
    """`==> reading ...` then `done in 1.2 s`: the reading step's time."""
    lines = [line.strip() for line in progress.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("==> reading") and i + 1 < len(lines) \
                and lines[i + 1].startswith("done in "):
            return {"read": float(lines[i + 1].split()[2])}
    return {}


def library_apply(update: Path, root: Path, run_dir: Path) -> dict[str, float]:
    """What the CLI does, through the library: its phases' times."""
    opts = ApplyOptions(root=root, run_dir=run_dir)
    start = time.monotonic()
    with staging(opts) as place:
        spool = Spool(place)
        try:
            with open_update(os.fspath(update), staging=place) as reader:
                members = read_all(reader, spool)
                read = time.monotonic()
                apply_members(opts, members, spool)
                applied = time.monotonic()
        finally:
            spool.close()
    return {"read": read - start, "plan+write": applied - read}


def dmoverlay_library(bench: Bench, kind: str) -> Callable[[Path], dict[str, float]]:
    """In this process, which has run the steps before: no interpreter start,
    no imports, a warm allocator."""
    def job(root: Path) -> dict[str, float]:
        return library_apply(bench.path_of(kind), root, bench.run_dir)
    return job


def dmoverlay_library_process(bench: Bench, kind: str) -> Callable[[Path], dict[str, float]]:
    """The same in a new Python process (this script, --library-apply), which
    reports its phases on stderr: what starting a process costs beyond imports."""
    def job(root: Path) -> dict[str, float]:
        err = quiet_run([sys.executable, __file__, "--library-apply", bench.path_of(kind),
                         root, bench.run_dir], env=dict(os.environ))
        phases: dict[str, float] = json.loads(err.strip().splitlines()[-1])
        return phases
    return job


def startup(bench: Bench, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        with stopwatch() as lap:
            quiet_run([bench.exe, "--version"], env=dict(os.environ))
        best = min(best, lap.wall)
    return best


def breakdown(bench: Bench, kind: str, repeat: int) -> dict[str, float]:
    """Where the in-process time goes, without a profiler: reading (with
    spooling), planning (a dry run of the same members), the rest of the apply
    (space check, writes, renames, journal)."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        root = bench.fresh_root()
        gc.collect()
        opts = ApplyOptions(root=root, run_dir=bench.run_dir)
        with staging(opts) as place:
            spool = Spool(place)
            try:
                start = time.monotonic()
                with open_update(os.fspath(bench.path_of(kind)), staging=place) as reader:
                    members = read_all(reader, spool)
                read = time.monotonic()
                apply_members(replace(opts, dry_run=True), members, spool)
                planned = time.monotonic()
                apply_members(opts, members, spool)
                applied = time.monotonic()
            finally:
                spool.close()
        verify(root, bench.update, bench.want, bench.sample, journal=True)
        got = {"read + spool": read - start, "plan": planned - read,
               "check space + write + rename + journal": applied - planned - (planned - read)}
        best = {k: min(v, best.get(k, v)) for k, v in got.items()}
    return best


def profile(bench: Bench, kind: str, lines: int = 25) -> dict[str, str]:
    """cProfile of the in-process apply: top functions by cumulative and by own time."""
    job = dmoverlay_library(bench, kind)
    root = bench.fresh_root()
    prof = cProfile.Profile()
    prof.enable()
    job(root)
    prof.disable()
    out: dict[str, str] = {}
    for key in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats(key).print_stats(lines)
        out[key] = text.getvalue()
    return out


# ---------------------------------------------------------------- the run


@dataclass
class Result:
    data: dict[str, int]
    tmpfs: str
    rows: list[Row]
    startup_seconds: float  # `dmoverlay --version`: interpreter start and imports
    headline: dict[str, float]
    goals_met: dict[str, bool]
    load: tuple[float, float]
    code: str  # the commit measured, and whether dmoverlay/ had uncommitted changes
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # by input
    profile: dict[str, str] | None = None
    rollback_seconds: float = 0.0  # `dmoverlay rollback` of the tar's apply


STEPS = (
    ("dracut loop (find -exec mkdir/cp -a)", "directory", None),
    ("tar -x --keep-directory-symlink", "tar", None),
    ("dmoverlay apply (CLI)", "directory", "cli"),
    ("dmoverlay apply (CLI)", "tar", "cli"),
    ("dmoverlay apply (CLI)", "cpio.gz", "cli"),
    ("dmoverlay apply (CLI, --jobs 1)", "directory", "cli1"),
    ("dmoverlay apply (CLI, --jobs 1)", "tar", "cli1"),
    ("dmoverlay library, new process", "directory", "process"),
    ("dmoverlay library, new process", "tar", "process"),
    ("dmoverlay library, in-process", "directory", "lib"),
    ("dmoverlay library, in-process", "tar", "lib"),
    ("dmoverlay library, in-process", "cpio.gz", "lib"),
)
RUNNERS = {"cli": dmoverlay_cli, "cli1": dmoverlay_cli_one_process,
           "process": dmoverlay_library_process, "lib": dmoverlay_library}


def measure(bench: Bench, repeat: int, data: dict[str, int], size: str,
            force_profile: bool) -> Result:
    load_before = load_average()
    rows = []
    for step, kind, how in STEPS:
        print(f"timing {step} from the {kind}", file=sys.stderr)
        if how is None:
            job = dracut_loop(bench) if kind == "directory" else tar_extract(bench)
        else:
            job = RUNNERS[how](bench, kind)
        seconds, cpu, phases = timed(bench, repeat, job, journal=how is not None)
        rows.append(Row(step, kind, seconds, cpu, phases=phases))
    dracut, tar = rows[0].seconds, rows[1].seconds
    for r in rows:
        r.speedup_vs_dracut = dracut / r.seconds
        r.vs_tar = r.seconds / tar
    head = headline(rows)
    goals = {"vs_dracut": head["dracut_over_cli_directory"] >= GOAL_VS_DRACUT,
             "vs_tar": head["cli_tar_over_tar"] <= GOAL_VS_TAR}
    result = Result(data, size, rows, startup(bench, repeat), head, goals,
                    (load_before, load_average()), code_version())
    print("timing dmoverlay rollback of the tar's apply", file=sys.stderr)
    result.rollback_seconds = rollback_seconds(bench, repeat)
    if force_profile or not all(goals.values()):
        for kind in ("directory", "tar"):
            print(f"timing the parts of an in-process apply of the {kind}", file=sys.stderr)
            result.breakdown[kind] = breakdown(bench, kind, repeat)
        print("profiling the in-process apply of the tar", file=sys.stderr)
        result.profile = profile(bench, "tar")
    return result


def code_version() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", repo, "status",
                                "--porcelain", "dmoverlay"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in dmoverlay/" if dirty else "")


def headline(rows: list[Row]) -> dict[str, float]:
    """The two goals' ratios, by wall time (the goals) and by CPU time."""
    def row(step: str, kind: str) -> Row:
        return next(r for r in rows if r.step == step and r.input == kind)

    dracut, tar = rows[0], rows[1]
    cli, lib = "dmoverlay apply (CLI)", "dmoverlay library, in-process"
    cli_dir, cli_tar = row(cli, "directory"), row(cli, "tar")
    lib_dir, lib_tar = row(lib, "directory"), row(lib, "tar")
    return {
        "dracut_over_cli_directory": dracut.seconds / cli_dir.seconds,
        "cli_tar_over_tar": cli_tar.seconds / tar.seconds,
        "dracut_over_library_directory": dracut.seconds / lib_dir.seconds,
        "library_tar_over_tar": lib_tar.seconds / tar.seconds,
        "cpu_dracut_over_cli_directory": dracut.cpu_seconds / cli_dir.cpu_seconds,
        "cpu_cli_tar_over_tar": cli_tar.cpu_seconds / tar.cpu_seconds,
    }


TABLE = Table((Column("step", "<38"), Column("input", "<11"), Column("seconds", ">8.2f"),
               Column("cpu s", ">7.2f"), Column("x faster", ">10.1f"), Column("x tar", ">7.2f")))


def report(res: Result) -> None:
    d = res.data
    print(f"update: {d['small_files']} small files ({d['small_least']}-{d['small_most']} "
          f"bytes), {d['large_files']} large ({d['large_mib']} MiB in all), "
          f"{d['symlinks']} symlinks, "
          f"{d['directories']} directories, {d['update_bytes'] / MiB:.0f} MiB; "
          f"{d['replaced']} files replace older ones in the root")
    print(f"all on a tmpfs (size={res.tmpfs}); {load_text(*res.load)}; code {res.code}")
    print("x faster: than the dracut loop; x tar: this time / tar's (both by wall time)")
    print(TABLE.header())
    for r in res.rows:
        extra = ", ".join(f"{k} {v:.2f} s" for k, v in r.phases.items())
        print(TABLE.row(r.step, r.input, r.seconds, r.cpu_seconds, r.speedup_vs_dracut, r.vs_tar)
              + (f"  ({extra})" if extra else ""))
    print(TABLE.row("dmoverlay --version (start-up)", "", res.startup_seconds))
    print(TABLE.row("dmoverlay rollback (CLI) of the tar's", "", res.rollback_seconds))
    h, ok = res.headline, res.goals_met
    print(f"dracut loop / dmoverlay apply DIR = {h['dracut_over_cli_directory']:.1f} x "
          f"(goal >= {GOAL_VS_DRACUT:g}: {'met' if ok['vs_dracut'] else 'MISSED'}; "
          f"in-process {h['dracut_over_library_directory']:.1f} x)")
    print(f"dmoverlay apply TAR / tar -x = {h['cli_tar_over_tar']:.2f} x "
          f"(goal <= {GOAL_VS_TAR:g}: {'met' if ok['vs_tar'] else 'MISSED'}; "
          f"in-process {h['library_tar_over_tar']:.2f} x)")
    print(f"by CPU time: dracut loop / dmoverlay DIR = {h['cpu_dracut_over_cli_directory']:.1f} x, "
          f"dmoverlay TAR / tar = {h['cpu_cli_tar_over_tar']:.2f} x")
    for kind, parts in res.breakdown.items():
        print(f"in-process apply of the {kind}, by part: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in parts.items()))
    if res.profile:
        for key, text in res.profile.items():
            print(f"\n--- in-process apply of the tar, top 25 by {key} ---")
            print(text.strip())


@contextmanager
def tmpfs(scratch: Path, size: str) -> Iterator[Path]:
    """A tmpfs on a new directory of `scratch`, unmounted and removed on exit."""
    top = Path(tempfile.mkdtemp(prefix="apply-bench.", dir=scratch))
    try:
        quiet_run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", top])
        try:
            yield top
        finally:
            unmount(top)
    finally:
        os.rmdir(top)


def prepare(top: Path, files: int, exe: str, shape: Shape) -> tuple[Bench, dict[str, int]]:
    update, pristine, run_dir = top / "update", top / "pristine", top / "run"
    for d in (update, pristine, run_dir):
        d.mkdir()
    print(f"writing the update ({files} small files) and the root", file=sys.stderr)
    data = make_data(update, pristine, files, shape)
    print("packing update.tar and update.cpio.gz (gzip -9)", file=sys.stderr)
    tar, cpio = make_archives(update, top)
    upd = manifest(update)
    want = expected_manifest(manifest(pristine), upd)
    names = sorted(n for n, e in upd.items() if e[0] == "file")
    sample = [n for i, n in enumerate(names)
              if i % SAMPLE_EVERY == 0 or n.startswith("lib/firmware/")]
    bench = Bench(top, update, tar, cpio, pristine, run_dir, exe, want, sample)
    return bench, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="small files in the update")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per step")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="large",
                        help="large: 1-8 KiB files and 140 MiB in four; small: 64-512 "
                             "bytes, 100 to a directory, and 32 MiB in four")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--profile", action="store_true",
                        help="profile the in-process apply even when the goals are met")
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp"),
                        help="where to make the tmpfs mount point")
    parser.add_argument("--tmpfs-size", default="4g", help="size= of the tmpfs")
    parser.add_argument("--library-apply", nargs=3, type=Path, help=argparse.SUPPRESS,
                        metavar=("UPDATE", "ROOT", "RUN"))  # one run in a new process
    args = parser.parse_args()
    if args.library_apply:
        log.quiet = True
        print(json.dumps(library_apply(*args.library_apply)), file=sys.stderr)
        return
    if os.geteuid() != 0:
        raise SystemExit("apply_bench needs root: it mounts a tmpfs, and the update has "
                         "root-owned files (run it with sudo)")
    if args.files < 1 or args.repeat < 1:
        raise SystemExit("--files and --repeat must be at least 1")
    exe = shutil.which("dmoverlay", path=os.path.dirname(sys.executable)) or "dmoverlay"
    compile_bytecode()
    os.umask(0o022)  # mkdir -p in dracut's loop makes 0755 directories, as the update has
    log.quiet = True
    try:
        with tmpfs(args.scratch, args.tmpfs_size) as top:
            bench, data = prepare(top, args.files, exe, SHAPES[args.shape])
            result = measure(bench, args.repeat, data, args.tmpfs_size, args.profile)
    except Failed as exc:
        raise SystemExit(str(exc)) from None
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
