"""dmoverlay-boot, the dracut hooks' entry without click, says what the
command line it stands for says: the same lines on stdout and stderr and
the same exit code, for the same good and bad inputs.  Each pair runs as
two processes, in a mount namespace whose /run is a fresh tmpfs (their
state and staging directories are the live /run's, fixed by the hooks)."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmoverlay.boot import hooks
from dmoverlay.cli import cli
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.dmtable import Mode
from dmoverlay.overlay.options import SetupOptions
from dmoverlay.overlay.state import State

CLI = "from dmoverlay.cli import main; main()"
BOOT = "from dmoverlay.boot.hooks import main; main()"
# /run a tmpfs of this process's own, then the command (as root only)
PRIVATE_RUN = 'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"'

needs_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a private /run needs root and unshare")


def _python(code: str, *args: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_RUN, "sh",
            sys.executable, "-c", code, *args]


def run(code: str, *args: str) -> tuple[int, str, str]:
    result = subprocess.run(_python(code, *args), capture_output=True, text=True, check=False,
                            timeout=120, env=os.environ | {"DMOVERLAY_BLOCKDEV": "util-linux"})
    return result.returncode, result.stdout, result.stderr


def both_setup(line: Path, target: Path) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    return (run(CLI, "setup", "--from-cmdline", str(line), "--target", str(target)),
            run(BOOT, "setup", str(line), str(target)))


@needs_namespace
@pytest.mark.parametrize(("text", "first_error"), [
    (None, "cannot read the command line"),
    ("", "no live root"),
    ("root=live:LABEL=LIVE rd.live.bogus=1\n", "unknown option rd.live.bogus"),
    ("root=live:LABEL=LIVE rd.live.overlay.size=\x1b[2Jbig\n", "not a whole number"),
    ('root=live:"LABEL=LIVE\n', "a double quote is not closed"),
    ("root=live:{image} rd.live.overlay.size=abc\n", "not a whole number of MiB"),
    # past the command line: the host has no device-mapper, the note comes first
    ("root=live:{image} rd.live.updates=/u.img\n", "device-mapper"),
    ("root=live:{image} rd.live.overlay={image}:/ov.img\n", "holds no filesystem"),
    ("root=live:{image} rd.live.overlay.size=64 rd.live.overlay.thin rd.live.ram\n",
     "device-mapper"),
])
def test_setup_says_the_same(tmp_path: Path, text: str | None, first_error: str) -> None:
    image = tmp_path / "squashfs.img"
    image.write_bytes(bytes(MiB))
    line = tmp_path / "cmdline"
    if text is not None:
        line.write_text(text.format(image=image))
    target = tmp_path / "target"
    target.mkdir()
    by_cli, by_boot = both_setup(line, target)
    assert by_boot == by_cli
    code, out, err = by_boot
    assert code == 1 and out == "", err
    assert first_error in err.split("error: ", 1)[1].splitlines()[0], err
    assert "\x1b" not in err and "Traceback" not in err


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A web server on 127.0.0.1 for the files in a directory: its URL and the directory."""
    top = tmp_path / "www"
    top.mkdir()
    handler = lambda *a: _Files(*a, directory=os.fspath(top))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", top
    finally:
        httpd.shutdown()
        httpd.server_close()


def _update(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("etc/fixed.conf")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"fixed\n"))


@needs_namespace
@pytest.mark.parametrize(("text", "code", "applied"), [
    ("root=live:LABEL=LIVE quiet\n", 0, False),  # no updates: nothing said (-q)
    ("root=live:LABEL=LIVE rd.live.updates={url}/u.tar\n", 0, True),
    ("rd.live.updates={url}/u.tar rd.live.updates={url}/missing.tar\n", 1, True),
    ("root=live:LABEL=LIVE rd.live.updates=/LiveOS/u.tar\n", 1, False),  # no medium set up
    ("rd.live.updates=\x1b[2J\n", 1, False),
    (None, 1, False),
])
def test_apply_says_the_same(tmp_path: Path, served: tuple[str, Path], text: str | None,
                             code: int, applied: bool) -> None:
    url, www = served
    _update(www / "u.tar")
    line = tmp_path / "cmdline"
    if text is not None:
        line.write_text(text.format(url=url))
    results: list[tuple[int, str, str]] = []
    for code_, args in ((CLI, ["-q", "apply", "--from-cmdline", str(line), "--root"]),
                        (BOOT, ["apply", str(line)])):
        root = tmp_path / f"root{len(results)}"
        (root / "etc").mkdir(parents=True)
        results.append(run(code_, *args, str(root)))
        assert (root / "etc/fixed.conf").exists() is applied
    assert results[1] == results[0]
    assert results[1][0] == code, results[1]
    assert results[1][1] == ""
    assert "\x1b" not in results[1][2] and "Traceback" not in results[1][2]


@needs_namespace
def test_a_missing_root_is_refused_alike(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, www = served
    _update(www / "u.tar")
    line = tmp_path / "cmdline"
    line.write_text(f"rd.live.updates={url}/u.tar\n")
    root = str(tmp_path / "nowhere")
    by_cli = run(CLI, "-q", "apply", "--from-cmdline", str(line), "--root", root)
    by_boot = run(BOOT, "apply", str(line), root)
    assert by_boot == by_cli
    assert by_boot[0] == 1 and "not a directory" in by_boot[2], by_boot


@needs_namespace
def test_sigterm_ends_both_alike(tmp_path: Path) -> None:
    """A download cut by SIGTERM: exit 143, the same line, nothing left in /run."""
    started = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000000")
            self.end_headers()
            started.set()
            try:
                for _ in range(2000):
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(0.01)
            except OSError:
                pass

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    line = tmp_path / "cmdline"
    line.write_text(f"rd.live.updates=http://127.0.0.1:{httpd.server_address[1]}/u.tar\n")
    pid_file = tmp_path / "pid"
    # the command in the background of a shell that then lists what it left in /run
    after = ('"$@" & echo $! > "$PIDFILE"; wait $!; echo "exit $?"; '
             'find /run -mindepth 1 ! -name dmoverlay')
    seen: list[tuple[str, str]] = []
    try:
        for code, args in ((CLI, ["-q", "apply", "--from-cmdline", str(line), "--root"]),
                           (BOOT, ["apply", str(line)])):
            root = tmp_path / f"root{len(seen)}"
            root.mkdir()
            started.clear()
            pid_file.unlink(missing_ok=True)
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount -t tmpfs -o mode=0755 tmpfs /run && ' + after, "sh",
                 sys.executable, "-c", code, *args, str(root)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=os.environ | {"DMOVERLAY_BLOCKDEV": "util-linux", "PIDFILE": str(pid_file)})
            try:
                assert started.wait(60), proc.communicate()
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
                out, err = proc.communicate(timeout=60)
            finally:
                proc.kill()
            seen.append((out, err))
            assert list(root.iterdir()) == []
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen[1] == seen[0]
    out, err = seen[1]
    assert out == "exit 143\n", (out, err)  # nothing under /run but the empty state dir
    assert err == "error: terminated (SIGTERM); what was under way was undone\n"


@pytest.mark.parametrize("args", [[], ["setup"], ["setup", "a"], ["status", "a", "b"],
                                  ["setup", "a", "b", "c"], ["--help"], ["apply", "a", ""],
                                  ["apply", "a", "sysroot"], ["setup", "a", "."]])
def test_anything_but_the_two_commands_is_a_usage_error(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", BOOT, *args], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: usage: {hooks.USAGE}",
        "hint: it runs the dracut hooks' two commands; `dmoverlay` is the whole command line"]


@pytest.mark.parametrize("state", [
    State("live", "/sysroot", "LABEL=LIVE", 512 * MiB),
    State("live", "/sysroot", "LABEL=LIVE", 512 * MiB, thin=True, ram_copy=3 * GiB // 2),
    State("live", "/sysroot", "LABEL=LIVE", 0, mode=Mode.PERSISTENT.value,
          overlay="/run/initramfs/overlayfs/LiveOS/overlay-LIVE-1234"),
    State("live", "/sysroot", "LABEL=LIVE", 256 * MiB, mode=Mode.READONLY.value,
          overlay="LABEL=KEEP:/ov.img"),
], ids=["ram", "thin-ram-copy", "persistent", "readonly"])
def test_a_setup_that_worked_is_said_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           state: State) -> None:
    """The host has no device-mapper: setup itself stands in (what it is
    asked, and what it returns), the command line is parsed for real."""
    asked: list[SetupOptions] = []

    def fake(opts: SetupOptions) -> State:
        asked.append(opts)
        return state
    monkeypatch.setattr("dmoverlay.cli.overlay.setup", fake)
    monkeypatch.setattr("dmoverlay.overlay.setup.setup", fake)
    line = tmp_path / "cmdline"
    line.write_text("root=live:LABEL=LIVE rd.live.overlay.size=512 rd.live.ram\n")
    by_cli = CliRunner().invoke(cli, ["setup", "--from-cmdline", str(line), "--target",
                                      "/sysroot"])
    previous = signal.getsignal(signal.SIGTERM)  # main() sets its own
    try:
        with pytest.raises(SystemExit) as end:
            hooks.main(["setup", str(line), "/sysroot"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    assert (end.value.code, out) == (by_cli.exit_code, by_cli.output)
    assert end.value.code == 0 and err == ""
    assert out.startswith("live: LABEL=LIVE writable at /sysroot ("), out
    assert asked[0] == asked[1]
