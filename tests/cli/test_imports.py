"""The command line imports a command's module only when that command is
asked for: which modules a run of `dmoverlay` brings in, not how long it takes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from dmoverlay.cli import COMMANDS, cli, summary_cut

# Runs dmoverlay's entry point and writes the modules it added to those the
# interpreter had at start-up (site may bring in some, such as urllib.parse).
PROBE = """
import sys
out = sys.argv.pop(1)
before = set(sys.modules)
try:
    from dmoverlay.cli import main
    main()
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(set(sys.modules) - before)))
"""

# What only some commands need: libblockdev and pyparted, the downloader, the
# archive readers and checksums, and the library behind each command.
HEAVY = {"gi", "parted", "urllib.request", "http.client", "ssl", "tarfile", "hashlib",
         "dmoverlay.apply.execute", "dmoverlay.apply.readers", "dmoverlay.build.image",
         "dmoverlay.build.source", "dmoverlay.core.compress", "dmoverlay.inspect",
         "dmoverlay.doctor", "dmoverlay.build.disk"}
COMMAND_MODULES = {lazy.module for lazy in COMMANDS.values()}


def dmoverlay(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """A `dmoverlay ARGS` run and the modules it imported."""
    out = tmp_path / "modules"
    result = subprocess.run([sys.executable, "-c", PROBE, str(out), *args],
                            capture_output=True, text=True, check=False)
    return result, set(out.read_text().split())


def test_version_imports_no_command(tmp_path: Path) -> None:
    result, added = dmoverlay(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "dmoverlay, version 0.1.0\n"
    assert "dmoverlay.cli" in added
    assert not added & (HEAVY | COMMAND_MODULES | {"dmoverlay.core.run", "subprocess"})


def test_help_lists_every_command_without_importing_them(tmp_path: Path) -> None:
    result, added = dmoverlay(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("Commands:\n", 1)[1].split()
    assert all(name in listed for name in COMMANDS)
    assert not added & (HEAVY | COMMAND_MODULES)


def test_status_help_imports_only_its_own_command(tmp_path: Path) -> None:
    result, added = dmoverlay(tmp_path, "status", "--help")
    assert result.returncode == 0, result.stderr
    assert "How full the overlay is, layer by layer." in result.stdout
    assert "dmoverlay.cli.overlay" in added
    assert not added & (HEAVY | COMMAND_MODULES - {"dmoverlay.cli.overlay"})


def test_errors_of_a_lazy_command_keep_their_form(tmp_path: Path) -> None:
    result, added = dmoverlay(tmp_path, "inspect", str(tmp_path / "missing.img"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'missing.img'}: no such file",
                                          "hint: check the path"]
    assert "dmoverlay.cli.apply" not in added


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result, added = dmoverlay(tmp_path, "frobnicate")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: No such command 'frobnicate'.",
                                          "hint: see dmoverlay --help"]
    assert not added & COMMAND_MODULES


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_listed_summary_is_the_commands_own(name: str) -> None:
    """The table's summary cuts to the same line as the command's docstring
    at every terminal width, so `dmoverlay --help` reads as click would print it."""
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    assert command.name == name
    for limit in range(10, 200):
        assert summary_cut(COMMANDS[name].summary, limit) \
            == command.get_short_help_str(limit), limit


# The setup path as the initramfs runs it: setup's command module, then a
# loop device queried and a state's steps undone through blockdev.
BLOCKDEV_PROBE = """
import sys
out = sys.argv.pop(1)
before = set(sys.modules)
try:
    import dmoverlay.cli.overlay
    from dmoverlay.overlay import blockdev
    print(blockdev.backend_name(), blockdev.loop_get_backing("/dev/loop987654"))
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(set(sys.modules) - before)))
"""
LIBBLOCKDEV_ONLY = {"gi", "ctypes", "dmoverlay.overlay.libblockdev"}


@pytest.mark.parametrize(("backend", "loaded"), [("util-linux", False), ("libblockdev", True)])
def test_setup_through_util_linux_imports_no_gi(tmp_path: Path, backend: str,
                                                loaded: bool) -> None:
    """What an initramfs without gi needs: none of it (and, forced the other
    way, the probe does see gi come in)."""
    out = tmp_path / "modules"
    result = subprocess.run([sys.executable, "-c", BLOCKDEV_PROBE, str(out)],
                            env=os.environ | {"DMOVERLAY_BLOCKDEV": backend},
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{backend} None\n"
    added = set(out.read_text().split())
    assert "dmoverlay.overlay.setup" in added
    if loaded:
        assert added >= LIBBLOCKDEV_ONLY
    else:
        assert not added & LIBBLOCKDEV_ONLY


# The initramfs's way: no site (-S), the environment ignored (-E); dmoverlay
# and the site-packages put on the path by hand, so that what the boot path
# asks for is found and seen here (click is there) rather than failing.
BOOT_PROBE = """
import sys
out, top, site = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1)
sys.path = [top, *sys.path, *site.split(":")]
try:
    from dmoverlay.boot.hooks import main
    main()
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""
# What the start-up of the hooks' commands leaves out: click and what it
# imports, typing (annotations only, under TYPE_CHECKING), tempfile (for
# build's streamed commands and odd debugfs names), and the commands the
# hooks do not run.
NOT_AT_BOOT = {"click", "typing", "tempfile", "gettext", "dmoverlay.cli",
               "dmoverlay.overlay.status", "dmoverlay.overlay.watch", "dmoverlay.build"}


def boot(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """A `dmoverlay-boot ARGS` run and every module it ended with."""
    import site

    import dmoverlay

    out = tmp_path / "modules"
    top = os.fspath(Path(dmoverlay.__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-E", "-S", "-c", BOOT_PROBE, str(out), top,
                             ":".join(site.getsitepackages()), *args],
                            capture_output=True, text=True, check=False,
                            env=os.environ | {"DMOVERLAY_BLOCKDEV": "util-linux"})
    return result, set(out.read_text().split())


def test_setup_at_boot_imports_no_click_nor_typing(tmp_path: Path) -> None:
    """Up to setup's first step (reading the command line, refused here),
    all that setup runs on is imported, and none of NOT_AT_BOOT."""
    result, modules = boot(tmp_path, "setup", "/dev/null", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: kernel command line: no live root"), result.stderr
    assert {"dmoverlay.overlay.setup", "dmoverlay.overlay.cmdline", "subprocess",
            "json"} <= modules
    assert not modules & (NOT_AT_BOOT | HEAVY), modules & (NOT_AT_BOOT | HEAVY)


def test_apply_at_boot_imports_no_click(tmp_path: Path) -> None:
    line = tmp_path / "cmdline"
    line.write_text("root=live:LABEL=LIVE\n")
    result, modules = boot(tmp_path, "apply", str(line), str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert "dmoverlay.boot.updates" in modules
    assert not modules & {"click", "dmoverlay.cli", "dmoverlay.build"}
