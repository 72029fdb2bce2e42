"""A real distribution root for the boot suite: Debian 12 (systemd, udev)
made by mmdebstrap from Debian's package repository, with a probe service
that reports, once the system has started, whether it reached multi-user
with no failed unit, and how many boots its /var has seen.  dracut-core
is in it as on a system booted by dracut: its dracut-shutdown.service
unpacks the initramfs at shutdown, where the module's shutdown hook runs.
The tarball is cached (DMOVERLAY_CACHE, else
~/.cache/dmoverlay), named after what goes into it, so a second run does
not fetch it again."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

SUITE = "bookworm"
PACKAGES = "systemd-sysv,udev,kmod,dracut-core"
APT_OPTIONS = ['APT::Install-Recommends "false"']  # dracut-core recommends lvm2, mdadm...
PROBE = r"""#!/bin/sh
# dmoverlay's boot probe for a systemd root: after start-up, what it came to.
state=$(systemctl is-system-running --wait)
{
    echo "PROBE-BEGIN"
    echo "PROBE state $state"
    mkdir -p /var/lib/dmoverlay-probe && date +%s >> /var/lib/dmoverlay-probe/boots && sync
    echo "PROBE boots $(wc -l < /var/lib/dmoverlay-probe/boots)"
    # what shutting down through the initramfs needs (dracut-shutdown.service)
    [ -e /run/initramfs/.need_shutdown ] && echo "PROBE need_shutdown"
    echo "PROBE unit dracut-shutdown $(systemctl is-active dracut-shutdown.service)"
    systemctl --failed --no-legend --plain | while read -r unit rest; do
        echo "PROBE failed $unit"
    done
    while read -r dev mnt fs opts rest; do
        echo "PROBE mount $dev $mnt $fs $opts"
    done < /proc/mounts
    for d in /sys/block/dm-*; do
        [ -e "$d/dm/name" ] && echo "PROBE dm $(cat "$d/dm/name")"
    done
    journalctl -b --no-pager -o cat -g dmoverlay | while read -r line; do
        echo "PROBE journal $line"
    done
    echo "PROBE-END"
} > /dev/ttyS0
systemctl poweroff --no-block
"""
UNIT = """[Unit]
Description=dmoverlay boot probe: report how the system came up, then power off
After=multi-user.target

[Service]
# not oneshot: start-up, which the probe waits for, would then wait for it
Type=exec
ExecStart=/usr/local/sbin/dmoverlay-probe

[Install]
WantedBy=multi-user.target
"""
HOOKS = [
    f"cat > \"$1/usr/local/sbin/dmoverlay-probe\" <<'PROBE_EOF'\n{PROBE}PROBE_EOF",
    "chmod 755 \"$1/usr/local/sbin/dmoverlay-probe\"",
    f"cat > \"$1/etc/systemd/system/dmoverlay-probe.service\" <<'UNIT_EOF'\n{UNIT}UNIT_EOF",
    "ln -s /etc/systemd/system/dmoverlay-probe.service "
    "\"$1/etc/systemd/system/multi-user.target.wants/dmoverlay-probe.service\"",
    "echo dmoverlay-live > \"$1/etc/hostname\"",
    # the console is the probe's: no login prompt in the middle of its lines
    "ln -s /dev/null \"$1/etc/systemd/system/serial-getty@ttyS0.service\"",
]


def cache_dir() -> Path:
    return Path(os.environ.get("DMOVERLAY_CACHE") or Path.home() / ".cache" / "dmoverlay")


def root_tarball() -> Path:
    """The cached root tarball, made now if missing."""
    made_of = "\n".join([SUITE, PACKAGES, *APT_OPTIONS, *HOOKS])
    key = hashlib.sha256(made_of.encode()).hexdigest()[:12]
    tarball = cache_dir() / f"debian-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    argv = ["mmdebstrap", "--quiet", "--variant=important", f"--include={PACKAGES}"]
    argv += [f"--aptopt={option}" for option in APT_OPTIONS]
    argv += [f"--customize-hook={hook}" for hook in HOOKS]
    argv += [SUITE, str(partial)]
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)
    partial.rename(tarball)
    return tarball
