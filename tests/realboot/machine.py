"""Booting real kernels for the boot suite: Debian's stock kernel under
qemu (software emulation), an initramfs made by stock dracut with the
dmoverlay module, and a small root whose init is a probe.

The probe reports what / is from inside (mounts, device-mapper devices and
their tables, loop devices, files asked for on the command line) as lines
`PROBE ...` on the serial console, then powers off.  A boot that fails ends
by itself too: dracut gives up (rd.shell=0), the kernel panics and, with
panic=-1 and qemu's -no-reboot, qemu exits.  A boot that does not end within
its time is killed and fails its test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)  # the one running the tests, with dmoverlay importable
DRACUT = Path("/usr/lib/dracut")
# What the probe root carries besides busybox: dmsetup (the tables), with
# the libraries it links.
PROBE_TOOLS = ("/usr/sbin/dmsetup",)
# The drivers a qemu guest needs, and what setup uses; with these the
# initramfs is built in seconds, not the minute of every driver.
DRIVERS = ("virtio_pci virtio_blk virtio_net loop squashfs ext4 isofs vfat dm-mod "
           "dm-snapshot dm-thin-pool")
BASE_CMDLINE = ("console=ttyS0 panic=-1 rd.shell=0 rd.emergency=poweroff "
                "rd.retry=10 rd.timeout=60")

INIT = r"""#!/bin/busybox sh
# dmoverlay's boot probe: what / is, from inside, then power off.
export PATH=/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "PROBE-BEGIN"
echo "PROBE uptime $(cut -d' ' -f1 /proc/uptime)"
while read -r dev mnt fs opts rest; do
    echo "PROBE mount $dev $mnt $fs $opts"
done < /proc/mounts
for d in /sys/block/dm-*; do
    [ -e "$d/dm/name" ] && echo "PROBE dm $(cat "$d/dm/name")"
done
dmsetup table 2>&1 | while read -r line; do echo "PROBE table $line"; done
for b in /sys/block/loop*/loop/backing_file; do
    [ -e "$b" ] && echo "PROBE loop $(cat "$b")"
done
[ -L /lib ] && echo "PROBE link /lib $(readlink /lib)"
for word in $(cat /proc/cmdline); do
    case "$word" in
        probe.cat=*)
            f=${word#probe.cat=}
            if [ -f "$f" ]; then echo "PROBE file $f $(cat "$f")"; else echo "PROBE nofile $f"; fi
            ;;
        probe.write=*)
            v=${word#probe.write=}
            echo "$v" > /probe-written && sync && echo "PROBE wrote $v"
            ;;
        probe.touch=*)
            : > "${word#probe.touch=}" 2>/dev/null && echo "PROBE touched ${word#probe.touch=}"
            ;;
    esac
done
echo "PROBE-END"
sync
poweroff -f
"""


def kernel() -> tuple[str, Path]:
    """(version, image) of the newest /boot/vmlinuz-* whose modules are here."""
    found = sorted((p.name.removeprefix("vmlinuz-"), p) for p in Path("/boot").glob("vmlinuz-*")
                   if (Path("/lib/modules") / p.name.removeprefix("vmlinuz-")).is_dir())
    if not found:
        raise RuntimeError("no /boot/vmlinuz-* with its modules: apt-get install linux-image-amd64")
    return found[-1]


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return [w for line in out.splitlines() for w in line.split() if w.startswith("/")]


def make_probe_root(root: Path) -> None:
    """A merged-/usr root (lib -> usr/lib, as Debian's) whose init is the probe."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "proc", "sys", "dev", "run", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, to in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                     ("lib64", "usr/lib64")):
        os.symlink(to, root / link)
    shutil.copy2("/bin/busybox", root / "usr/bin/busybox")
    for applet in ("sh", "mount", "cat", "cut", "readlink", "sync", "poweroff"):
        os.symlink("busybox", root / "usr/bin" / applet)
    for tool in PROBE_TOOLS:
        for path in [tool, *_libraries(tool)]:
            real = Path(os.path.realpath(path))
            dest = root / path.lstrip("/")
            dest = root / "usr" / dest.relative_to(root) if not path.startswith("/usr/") else dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, dest)
    (root / "usr/sbin/init").write_text(INIT)
    (root / "usr/sbin/init").chmod(0o755)
    (root / "etc/os-release").write_text("NAME=dmoverlay-probe\nID=probe\n")


def dracut_base(where: Path) -> Path:
    """Stock dracut's tree with the dmoverlay module installed into it, as
    `dmoverlay initramfs install` installs it (dracutbasedir= points dracut
    at it, so this machine's own dracut stays as it is)."""
    modules = where / "modules.d"
    modules.mkdir(parents=True)
    for entry in DRACUT.iterdir():
        if entry.name != "modules.d":
            os.symlink(entry, where / entry.name)
    for module in (DRACUT / "modules.d").iterdir():
        os.symlink(module, modules / module.name)
    subprocess.run([str(PYTHON), "-m", "dmoverlay", "initramfs", "install", "--moddir",
                    str(modules), "--no-conf"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(TOP)})
    return where


# The same initramfs but for the module that sets up the live root.
OURS = "bash base udev-rules kernel-modules dmoverlay"
DMSQUASH = "bash base udev-rules kernel-modules dmsquash-live"
# What dracut makes on a host with systemd: systemd runs the initramfs, and
# the module's hooks run from dracut's services.
SYSTEMD = f"systemd systemd-initrd dracut-systemd {OURS}"
# With dracut's shutdown: what a root with systemd and dracut unpacks to
# shut down in.  systemd's, as dracut makes it there: dracut's own init
# mounts /run noexec, where systemd-shutdown cannot run the unpacked one.
SHUTDOWN = f"{SYSTEMD} shutdown"
# With a network, for updates over http: dracut's network-legacy (dhclient).
NETWORK = f"{OURS} network network-legacy"


def make_initramfs(base: Path, kver: str, out: Path, modules: str = OURS,
                   conf: str = "") -> Path:
    """`conf`: a dracut.conf.d snippet for this one initramfs."""
    # the host's dracut.conf and dracut.conf.d are left out: dracut-network
    # alone adds a module there (ifcfg) that brings in a network and systemd
    confdir = base / f"conf-{out.stem}.d"
    confdir.mkdir(exist_ok=True)
    if conf:
        (confdir / "90-test.conf").write_text(conf)
    subprocess.run(["dracut", "--quiet", "--force", "--conf", "/dev/null", "--confdir",
                    str(confdir), "--no-hostonly", "-m", modules,
                    "--drivers", DRIVERS, "--kver", kver, str(out)],
                   check=True, capture_output=True, text=True,
                   env={**os.environ, "dracutbasedir": str(base)}, timeout=600)
    return out


@dataclass
class Boot:
    """What one boot printed, and how it ended."""

    console: str
    seconds: float
    ended: bool  # qemu stopped by itself (powered off, or the kernel gave up)
    probe: list[str] = field(default_factory=list)

    def has(self, prefix: str) -> list[str]:
        return [line for line in self.probe if line.startswith(prefix)]

    @property
    def uptime(self) -> float:
        """Seconds from the kernel's start to the real root's init."""
        return float(self.has("uptime ")[0].split()[1])

    @property
    def root_mount(self) -> list[str]:
        """[device, fstype, options] of /."""
        mounts = [line.split()[1:] for line in self.has("mount ")]
        roots = [m for m in mounts if m[1] == "/"]
        return [roots[-1][0], roots[-1][2], roots[-1][3]] if roots else []

    def tables(self) -> dict[str, str]:
        return {line.split(":", 1)[0].removeprefix("table ").strip(): line.split(":", 1)[1].strip()
                for line in self.has("table ") if ":" in line}


def boot(kernel_image: Path, initrd: Path, cmdline: str, disks: list[Path], *,
         log: Path, timeout: float = 300, snapshot: bool = False,
         memory: str = "1024", network: bool = False) -> Boot:
    """Boot once; the serial console goes to `log`.  With `network`, a NIC
    on qemu's user-mode network, where 10.0.2.2 is this host's loopback."""
    drives = []
    if network:
        drives += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    for disk in disks:
        drives += ["-drive", f"file={disk},if=virtio,format=raw"
                   + (",snapshot=on" if snapshot else "")]
    argv = ["qemu-system-x86_64", "-machine", "accel=tcg", "-cpu", "max", "-smp", "2",
            "-m", memory, "-nodefaults", "-nographic", "-no-reboot",
            "-serial", f"file:{log}", "-kernel", str(kernel_image), "-initrd", str(initrd),
            "-append", f"{BASE_CMDLINE} {cmdline}", *drives]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=timeout)
        ended = True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        ended = False
    seconds = time.monotonic() - start
    console = log.read_text(errors="replace")
    probe = []
    inside = False
    for line in console.splitlines():
        line = line.strip()
        if line.endswith("PROBE-BEGIN"):  # a login prompt may share the line
            inside = True
        elif line == "PROBE-END":
            inside = False
        elif inside and line.startswith("PROBE "):
            probe.append(line.removeprefix("PROBE "))
    return Boot(console, seconds, ended, probe)
