"""The boot suite: real kernels booted under qemu with an initramfs made by
stock dracut and the dmoverlay module (scripts/boottest runs it).  Each boot
takes tens of seconds under software emulation, so the suite runs only with
DMOVERLAY_BOOT=1; a plain `pytest` deselects it and says so.  With it, a
missing tool fails every test: a boot test that did not run never passes."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realboot import machine
from tests.signkit import KeyPair, make_key

ENV = "DMOVERLAY_BOOT"
HERE = Path(__file__).resolve().parent
_deselected = pytest.StashKey[int]()


def boot_run() -> bool:
    return os.environ.get(ENV) == "1"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if HERE in Path(i.path).resolve().parents]
    for item in mine:
        item.add_marker(pytest.mark.boot)
    if mine and not boot_run():
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
        config.stash[_deselected] = len(mine)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    count = config.stash.get(_deselected, 0)
    if count:
        terminalreporter.write_line(
            f"tests/realboot: {count} tests deselected ({ENV} is not 1); scripts/boottest boots "
            "them under qemu")


def _problems() -> list[str]:
    tools = ("dracut", "qemu-system-x86_64", "mkfs.ext4", "debugfs", "mksquashfs")
    problems = [f"{tool} is missing" for tool in tools if shutil.which(tool) is None]
    if not Path("/bin/busybox").exists():
        problems.append("/bin/busybox is missing (busybox-static)")
    try:
        machine.kernel()
    except RuntimeError as exc:
        problems.append(str(exc))
    return problems


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path | str]]:
    """What every boot shares, made once: the kernel, the initramfs, and the
    live image built from the probe root."""
    problems = _problems()
    if problems:
        pytest.fail("boot run on an unfit machine: " + "; ".join(problems), pytrace=False)
    top = tmp_path_factory.mktemp("boot")
    kver, image = machine.kernel()
    base = machine.dracut_base(top / "dracut")
    initrd = machine.make_initramfs(base, kver, top / "initrd.img")
    root = top / "root"
    machine.make_probe_root(root)
    subprocess.run([str(machine.PYTHON), "-m", "dmoverlay", "-q", "build", str(root),
                    "-o", str(top / "squashfs.img"), "--disk", str(top / "disk.img"),
                    "--overlay-size", "32M", "--free", "64M", "--compression", "zstd",
                    "--all-root"],
                   check=True, env={**os.environ, "PYTHONPATH": str(machine.TOP)})
    yield {"kver": kver, "kernel": image, "initrd": initrd, "disk": top / "disk.img",
           "root": root, "top": top, "dracut": base}


def _another_initrd(kit: dict[str, Path | str], name: str, modules: str,
                    needs: tuple[str, str] | None = None, conf: str = "") -> Path:
    """An initramfs beside the kit's, with other dracut modules; `needs`:
    (a module directory it requires, the package that ships it); `conf`: a
    dracut.conf.d snippet for it."""
    if needs and not (machine.DRACUT / "modules.d" / needs[0]).is_dir():
        pytest.fail(f"dracut's {needs[0]} is missing: apt-get install {needs[1]}",
                    pytrace=False)
    return machine.make_initramfs(Path(kit["dracut"]), str(kit["kver"]),
                                  Path(kit["top"]) / name, modules, conf)


@pytest.fixture(scope="session")
def dmsquash_initrd(kit: dict[str, Path | str]) -> Path:
    """Stock dracut's own dmsquash-live, for the same image."""
    return _another_initrd(kit, "initrd-dmsquash.img", machine.DMSQUASH,
                           ("90dmsquash-live", "dracut-live"))


@pytest.fixture(scope="session")
def systemd_initrd(kit: dict[str, Path | str]) -> Path:
    """The module in an initramfs that systemd runs, as dracut makes it by
    default where systemd is installed (Fedora, Debian with dracut)."""
    return _another_initrd(kit, "initrd-systemd.img", machine.SYSTEMD)


@pytest.fixture(scope="session")
def network_initrd(kit: dict[str, Path | str]) -> Path:
    """The module with dracut's network (for updates over http)."""
    return _another_initrd(kit, "initrd-network.img", machine.NETWORK,
                           ("35network-legacy", "dracut-network"))


@pytest.fixture(scope="session")
def shutdown_initrd(kit: dict[str, Path | str]) -> Path:
    """With dracut's shutdown module, as dracut includes it by default: the
    booted system unpacks it at shutdown and runs the module's shutdown hook."""
    return _another_initrd(kit, "initrd-shutdown.img", machine.SHUTDOWN)


@pytest.fixture(scope="session")
def update_key(kit: dict[str, Path | str]) -> KeyPair:
    """The key updates are signed with at boot: its public half is in
    signed_initrd, as dracut.conf's dmoverlay_updates_keys puts it."""
    return make_key(Path(kit["top"]) / "keys", "updates")


@pytest.fixture(scope="session")
def signed_initrd(kit: dict[str, Path | str], update_key: KeyPair) -> Path:
    """With the network, and the keys every update must be signed by; and
    without TLS (dmoverlay_https=no): its updates come by http, checked."""
    return _another_initrd(kit, "initrd-signed.img", machine.NETWORK,
                           ("35network-legacy", "dracut-network"),
                           conf=f'dmoverlay_updates_keys="{update_key.public}"\n'
                                "dmoverlay_https=no\n")
