"""Time from kernel start to the real root's init (just after switch_root),
and initramfs size: dmoverlay's dracut module against stock dracut's own
dmsquash-live, on the same image, kernel, drivers and command line, in one
run.  The boots take turns (and turns at going first) under qemu's software
emulation; the probe root's init reads /proc/uptime first thing.

    .venv/bin/python bench/boot_bench.py [--repeat 3] [--json]

Goal: dmoverlay <= 1.15 x dmsquash-live.  Needs what scripts/boottest needs
(dracut-core, dracut-live, qemu, the stock kernel).  Nothing here asserts a
time: it prints figures for people.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.realboot import machine

CMDLINE = "root=live:LABEL=LIVE rd.live.overlay.size=64 quiet"


def _python_bytes(initrd: Path) -> int:
    """What the interpreter, its zip, extensions and the libraries only
    they link weigh in the initramfs, uncompressed."""
    listing = subprocess.run(["lsinitrd", str(initrd)], capture_output=True, check=True
                             ).stdout.decode(errors="replace")  # it also prints binary
    total = 0
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 9 and fields[0].startswith("-") and any(
                key in fields[8] for key in ("python3", "libffi", "libssl", "libcrypto",
                                             "libmpdec", "libexpat", "liblzma", "libbz2",
                                             "libuuid", "usr/bin/dmoverlay")):
            total += int(fields[4])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kver, kernel = machine.kernel()
    with tempfile.TemporaryDirectory(prefix="boot-bench-") as scratch:
        top = Path(scratch)
        base = machine.dracut_base(top / "dracut")
        initrds = {
            "dmoverlay": machine.make_initramfs(base, kver, top / "ours.img", machine.OURS),
            "dmsquash-live": machine.make_initramfs(base, kver, top / "dmsquash.img",
                                                    machine.DMSQUASH),
        }
        root = top / "root"
        machine.make_probe_root(root)
        subprocess.run([sys.executable, "-m", "dmoverlay", "-q", "build", str(root), "-o",
                        str(top / "squashfs.img"), "--disk", str(top / "disk.img"),
                        "--free", "64M", "--compression", "zstd", "--all-root"], check=True)
        times: dict[str, list[float]] = {name: [] for name in initrds}
        order = list(initrds)
        for turn in range(args.repeat):
            for name in order if turn % 2 == 0 else reversed(order):
                result = machine.boot(kernel, initrds[name], CMDLINE, [top / "disk.img"],
                                      log=top / f"{name}-{turn}.log", snapshot=True)
                if not result.ended or not result.probe:
                    print(f"{name}: boot {turn} failed; see its console:\n"
                          f"{result.console[-2000:]}", file=sys.stderr)
                    return 1
                times[name].append(result.uptime)
        sizes = {name: path.stat().st_size for name, path in initrds.items()}
        python = _python_bytes(initrds["dmoverlay"])
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["dmoverlay"] / median["dmsquash-live"]
    report = {"seconds_to_root_init": times, "median": median, "ratio": ratio,
              "initramfs_bytes": sizes, "python_bytes_uncompressed": python,
              "size_ratio": sizes["dmoverlay"] / sizes["dmsquash-live"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"kernel start -> real root's init, median of {args.repeat} (qemu TCG):")
    for name in initrds:
        each = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:<14} {median[name]:6.2f} s   ({each})")
    print(f"  ratio dmoverlay / dmsquash-live: {ratio:.2f} (goal <= 1.15)")
    print("initramfs (gzip, as dracut makes it):")
    for name, size in sizes.items():
        print(f"  {name:<14} {size / 2**20:6.1f} MiB")
    print(f"  ratio: {report['size_ratio']:.2f}; the Python dmoverlay carries: "
          f"{python / 2**20:.1f} MiB uncompressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
