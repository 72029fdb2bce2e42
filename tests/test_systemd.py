"""The systemd unit shipped in systemd/: systemd reads it without a warning,
it waits for the overlay setup records, and the command it runs is one the
CLI accepts, doing what the unit promises on a machine with no overlay."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmoverlay.cli import cli
from dmoverlay.overlay.options import STATE_DIR
from dmoverlay.overlay.state import state_path

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "dmoverlay-watch.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(UNIT.read_text())
    return parser


def _exec_start(unit: configparser.ConfigParser) -> list[str]:
    """ExecStart's words with ${VAR} taken from Environment=, as systemd
    expands them (a ${VAR} word unsplit)."""
    env = dict(word.split("=", 1) for word in shlex.split(unit["Service"]["Environment"]))
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word)
            for word in shlex.split(unit["Service"]["ExecStart"])]


def test_the_unit_runs_only_where_setup_recorded_the_boots_overlay() -> None:
    unit = _unit()
    assert unit["Unit"]["ConditionPathExists"] == os.fspath(state_path(STATE_DIR, "live"))
    assert "local-fs.target" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    argv = _exec_start(unit)
    assert argv[:2] == ["/usr/bin/dmoverlay", "watch"]
    assert argv[argv.index("--name") + 1] == "live"  # the name setup gives it at boot


def test_the_units_command_is_one_the_cli_runs(tmp_path: Path) -> None:
    """Its arguments as the CLI parses them, on a machine with no overlay:
    the one line it ends with, and status 0 (a unit that did not fail)."""
    argv = _exec_start(_unit())
    result = CliRunner().invoke(cli, [*argv[1:], "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: live: no overlay (torn down, or never set up): the watch " \
                            "ends\n"


def test_systemd_reads_the_unit_without_a_warning(tmp_path: Path) -> None:
    """systemd-analyze verify, offline; it checks that ExecStart's program
    exists, which /usr/bin/dmoverlay does not on a test machine: a copy that
    runs true stands for it (the path itself is checked above)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/bin/dmoverlay ", f"{shutil.which('true')} "))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
