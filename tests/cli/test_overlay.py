"""`dmoverlay setup` and `status` at the command line's edge: the texts parsed
there (their faults one error line naming the option, before anything is
made), and `status --json` printing the library's own record."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dmoverlay.cli import cli
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.options import SetupOptions
from dmoverlay.overlay.state import State, Step, StepKind
from dmoverlay.overlay.status import Status
from tests.overlay.statefiles import make_state, plant


@pytest.mark.parametrize(("args", "lines"), [
    (["--overlay", "LABEL=:/x"], ["error: --overlay LABEL=:/x: empty device spec 'LABEL='",
                                  "hint: name the device: LABEL=VALUE"]),
    (["--overlay", "SERIAL=1:/o"], ["error: --overlay SERIAL=1:/o: unknown device spec SERIAL=",
                                    "hint: use one of LABEL=, UUID=, PARTUUID=, PARTLABEL=, "
                                    "CDLABEL="]),
])
def test_bad_overlay_text_is_one_error_line(tmp_path: Path, args: list[str],
                                            lines: list[str]) -> None:
    (tmp_path / "target").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "dmoverlay", "setup", str(tmp_path / "x.img"), "--target",
         str(tmp_path / "target"), "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == lines
    assert not (tmp_path / "state").exists()


def test_a_medium_given_as_the_overlay_file_points_to_its_auto_path(tmp_path: Path) -> None:
    """`--overlay medium.img --overlay-size 32M`, meaning the medium's auto
    overlay: one error naming medium.img:auto, before anything is made (not
    the store's size, whose hint led on to a reset that wipes the medium)."""
    medium = tmp_path / "medium.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(medium), "4M"], check=True,
                   capture_output=True)
    result = _setup(tmp_path, str(medium), "--overlay", str(medium), "--overlay-size", "32M")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: --overlay {medium}: it holds a filesystem (ext), not an overlay store",
        f"hint: to keep the overlay in a file on it, name that file: {medium}:auto (dracut's "
        f"/LiveOS/overlay-<label>-<uuid>) or {medium}:/PATH"]
    assert not (tmp_path / "state").exists()


def _setup(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "target").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "dmoverlay", "setup", "--target", str(tmp_path / "target"),
         "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("args", "first"), [
    (["x.img", "--from-cmdline", "{line}"],
     "error: --from-cmdline takes IMAGE and the overlay options from the command line: "
     "IMAGE too"),
    (["--from-cmdline", "{line}", "--overlay", "LABEL=S", "--live-dir", "L"],
     "error: --from-cmdline takes IMAGE and the overlay options from the command line: "
     "--overlay --live-dir too"),
    (["--from-cmdline", "{line}", "--ram"],
     "error: --from-cmdline takes IMAGE and the overlay options from the command line: "
     "--ram too"),
    ([], "error: IMAGE is missing"),
    (["--from-cmdline", "{line}"], "error: kernel command line: unknown option rd.live.rams"),
])
def test_setup_from_a_command_line_refuses_in_one_line(tmp_path: Path, args: list[str],
                                                       first: str) -> None:
    line = tmp_path / "cmdline"
    line.write_text("root=live:LABEL=LIVE rd.live.rams\n")
    result = _setup(tmp_path, *(a.format(line=line) for a in args))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == first
    assert result.stderr.splitlines()[1].startswith("hint: ")
    assert not (tmp_path / "state").exists()


def test_status_json_is_the_librarys_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """A monitor reads the same keys as Status.to_dict() gives a caller of the
    library (device-mapper's status is not on this host: the library's answer
    stands in for it)."""
    st = Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=512 * MiB,
                mode="readonly", overlay="LABEL=LIVE:/o", kept_used=MiB, kept_total=GiB)
    monkeypatch.setattr("dmoverlay.cli.overlay.status", lambda state_dir, name: st)
    result = CliRunner().invoke(cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == st.to_dict()


@pytest.mark.parametrize(("args", "line"), [
    (["x.img", "--ram"], ""),
    (["--from-cmdline", "{line}"], "root=live:LABEL=LIVE rd.live.ram\n"),
    (["--from-cmdline", "{line}"], "root=live:LABEL=LIVE live_ram\n"),
])
def test_setup_ram_asks_the_library_to_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            args: list[str], line: str) -> None:
    """--ram, and rd.live.ram on a kernel command line, reach setup as
    SetupOptions.ram; what setup recorded is said in its line."""
    asked: list[SetupOptions] = []

    def fake(opts: SetupOptions) -> State:
        asked.append(opts)
        return State("live", "/sysroot", opts.image.text, 512 * MiB, ram_copy=3 * GiB // 2)
    monkeypatch.setattr("dmoverlay.cli.overlay.setup", fake)
    (tmp_path / "cmdline").write_text(line)
    result = CliRunner().invoke(cli, ["setup", "--target", str(tmp_path), *(
        a.format(line=tmp_path / "cmdline") for a in args)])
    assert result.exit_code == 0, result.output
    assert [opts.ram for opts in asked] == [True]
    assert result.stdout.endswith("(512.0 MiB COW in RAM; the image copied to RAM (1.5 GiB))\n")


def test_status_says_the_image_is_in_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    st = Status("live", "/sysroot", "active", used=GiB, total=4 * GiB, ram_free=None,
                ram_copy=GiB)
    monkeypatch.setattr("dmoverlay.cli.overlay.status", lambda state_dir, name: st)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("; at /sysroot; image in RAM (1.0 GiB)")


@pytest.mark.parametrize(("value", "why"), [
    ("90,80", "80 after 90: the thresholds must increase"),
    ("0,90", "0 is out of 1..100"),
    ("80,101", "101 is out of 1..100"),
    ("80,ninety", "'ninety' is not a percentage (a number such as 90 or 97.5)"),
])
def test_bad_thresholds_are_one_error_line_naming_the_option(tmp_path: Path, value: str,
                                                             why: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmoverlay", "watch", "--thresholds", value, "--state-dir",
         str(tmp_path / "state")], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: Invalid value for '--thresholds': {why}",
                                          "hint: see dmoverlay --help"]


@pytest.mark.parametrize(("value", "why"), [
    ("nan", "nan is not a number of seconds"),
    ("inf", "inf is not in the range 0.1<=x<=86400"),
    ("0", "0.0 is not in the range 0.1<=x<=86400"),
])
def test_bad_interval_is_one_error_line(value: str, why: str) -> None:
    """Refused before the first look, not by time.sleep after it."""
    result = CliRunner().invoke(cli, ["watch", "--interval", value, "--state-dir", "/none"],
                                standalone_mode=False)
    assert isinstance(result.exception, click.BadParameter)
    message = result.exception.format_message()
    assert message.startswith("Invalid value for '--interval': ") and why in message


def test_watch_without_an_overlay_ends_at_once_with_a_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["watch", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: live: no overlay (torn down, or never set up): the watch " \
                            "ends\n"


def test_watch_stopped_by_sigterm_exits_0(tmp_path: Path) -> None:
    """systemd stops the unit with SIGTERM: a clean end, not a failed unit.
    The overlay is recorded but its devices cannot be read on this host, so
    the watch goes on looking until it is stopped."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    make_state(tmp_path, Step(StepKind.DM, "live-rw")).save(state_dir / "live.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmoverlay", "watch", "--state-dir", str(state_dir),
         "--interval", "0.1"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the second failed look is said: it runs
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    assert first.startswith("warning: live: cannot read the COW's fill: ")
    assert proc.returncode == 0
    assert rest == "note: live: the watch stops (SIGTERM)\n"


# ------------------------------------------------- status for monitors


def _status(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmoverlay", "status", "--name", "live",
                           "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, check=False)


def _states(tmp_path: Path) -> dict[str, Path]:
    """A state directory for each way a status cannot be read (device-mapper
    is not asked for a device that exists, here or in the VM)."""
    refused, gone = tmp_path / "refused", tmp_path / "gone"
    plant(refused, "{not json")
    plant(gone, make_state(tmp_path, name="live").to_json())
    return {"absent": tmp_path / "none", "refused": refused, "gone": gone}


@pytest.mark.parametrize(("case", "code", "first"), [
    ("absent", 5, "error: no overlay named 'live' is set up"),
    ("refused", 6, "unreadable state"),
    ("gone", 7, "error: live: device live-rw cannot be asked"),
])
def test_status_says_why_it_cannot_read_by_its_exit_code(tmp_path: Path, case: str, code: int,
                                                         first: str) -> None:
    result = _status(_states(tmp_path)[case])
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and first in lines[0] and lines[1].startswith("hint: ")
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["absent", "refused", "gone"])
def test_prometheus_says_up_0_and_exits_0(tmp_path: Path, case: str) -> None:
    """A textfile collector's `status --prometheus > f.tmp && mv f.tmp f.prom`
    replaces stale numbers with up 0."""
    result = _status(_states(tmp_path)[case], "--prometheus")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == 'dmoverlay_up{name="live"} 0'
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("note: ")


@pytest.mark.parametrize(("args", "message"), [
    (["--prometheus", "--json"], "error: --json and --prometheus are two answers: give one"),
    (["--prometheus", "--threshold", "90"],
     "error: --threshold sets the exit code, which --prometheus leaves 0"),
])
def test_prometheus_with_what_it_cannot_honour_is_one_error(tmp_path: Path, args: list[str],
                                                            message: str) -> None:
    result = _status(tmp_path / "state", *args)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == message
    assert result.stdout == ""


def test_status_prints_a_line_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    st = Status("live", "/sysroot", "active", used=MiB, total=64 * MiB, ram_free=GiB,
                mode="readonly", overlay="LABEL=S:/o", kept_used=2 * MiB, kept_total=8 * MiB,
                image="/run/initramfs/live/LiveOS/squashfs.img", base_size=GiB,
                cow_file="/run/dmoverlay/live/cow")
    monkeypatch.setattr("dmoverlay.cli.overlay.status", lambda state_dir, name: st)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == [
        "  base  /run/initramfs/live/LiveOS/squashfs.img: the image, read-only, 1.0 GiB",
        "  store LABEL=S:/o: changes of earlier boots, shown read-only, 2.0 MiB of 8.0 MiB "
        "(25.0%)",
        "  ram   /run/dmoverlay/live/cow: changes until shutdown (RAM), 1.0 MiB of 64.0 MiB "
        "(1.6%), 1.0 GiB of RAM left",
    ]


def test_a_full_snapshot_has_layer_lines_without_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel gives no numbers for an overflowed snapshot: its line says the state."""
    st = Status("live", "/sysroot", "overflow", used=0, total=0, ram_free=GiB, image="/i",
                cow_file="/run/c")
    monkeypatch.setattr("dmoverlay.cli.overlay.status", lambda state_dir, name: st)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 4, result.output
    assert result.stdout.splitlines()[1:] == [
        "  base  /i: the image, read-only",
        "  ram   /run/c: changes until shutdown (RAM), overflow, 1.0 GiB of RAM left"]
