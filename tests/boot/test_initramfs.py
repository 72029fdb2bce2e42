"""What the initramfs carries of Python: the boot path's closure, the zip,
the wrapper, and the dracut module's installation.  The closure is checked
by running it: a copy of the interpreter beside only the staged zip and the
extension modules listed runs the boot path's commands for real."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dmoverlay.boot import initramfs
from dmoverlay.core.errors import UsageError


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, initramfs.Closure]:
    """A prefix holding the interpreter, the staged zip and the listed
    extensions, nothing else: what the initramfs holds of Python."""
    top = tmp_path_factory.mktemp("prefix")
    closure = initramfs.stage(top)
    python = top / closure.python.lstrip("/")
    shutil.copy2(closure.python, python)
    for extension in closure.extensions:
        dest = top / extension.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(extension, dest)
    return top, closure


def _run(top: Path, closure: initramfs.Closure, *args: str) -> subprocess.CompletedProcess[str]:
    """The staged wrapper's command line, with the staged interpreter."""
    python = top / closure.python.lstrip("/")
    return subprocess.run([str(python), "-I", "-S", "-c",
                           "from dmoverlay.cli import main; main()", *args],
                          capture_output=True, text=True, check=False, timeout=120,
                          env={"PATH": os.environ["PATH"], "DMOVERLAY_BLOCKDEV": "util-linux"})


def test_the_closure_holds_the_boot_path_and_nothing_of_the_host(
        staged: tuple[Path, initramfs.Closure]) -> None:
    _, closure = staged
    names = set(closure.pure)
    assert {"dmoverlay.cli.overlay", "dmoverlay.cli.apply", "dmoverlay.overlay.setup",
            "dmoverlay.overlay.utillinux", "dmoverlay.boot.updates", "click.core",
            "encodings.utf_8", "tarfile", "urllib.request"} <= names
    for left_out in ("gi", "parted", "dmoverlay.build", "dmoverlay.inspect", "dmoverlay.doctor",
                     "dmoverlay.overlay.libblockdev", "dmoverlay.boot.initramfs", "site",
                     "pytest", "hypothesis", "_pytest"):
        assert not [n for n in names if n == left_out or n.startswith(left_out + ".")], left_out
    assert closure.python == os.path.realpath(sys.executable)
    assert all(e.endswith(".so") and os.path.isabs(e) for e in closure.extensions)


def test_the_staged_python_runs_the_boot_commands(staged: tuple[Path, initramfs.Closure],
                                                   tmp_path: Path) -> None:
    """Every command the hooks run, and their errors, with only the zip:
    a module the closure missed is an ImportError here, not at boot."""
    top, closure = staged
    assert _run(top, closure, "--version").stdout == "dmoverlay, version 0.1.0\n"
    for command in ("setup", "apply", "teardown", "status", "watch"):
        result = _run(top, closure, command, "--help")
        assert result.returncode == 0 and "Usage: dmoverlay" in result.stdout, result.stderr
    bad = _run(top, closure, "apply", "--bogus")  # click's suggestions import difflib
    assert bad.returncode == 2 and bad.stderr.startswith("error: No such option"), bad.stderr
    line = tmp_path / "cmdline"
    line.write_text("root=live:LABEL=LIVE rd.live.bogus=1\n")
    target = tmp_path / "target"
    target.mkdir()
    refused = _run(top, closure, "setup", "--from-cmdline", str(line), "--target", str(target),
                   "--state-dir", str(tmp_path / "state"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith("error: kernel command line: ")


def test_the_staged_python_applies_an_update(staged: tuple[Path, initramfs.Closure],
                                             tmp_path: Path) -> None:
    """The apply path for real (tar reading, planning, writing, journal),
    through lib -> usr/lib, with a gzip update: the lazily imported
    decompressors are in the closure."""
    top, closure = staged
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    update = tmp_path / "updates.tar.gz"
    with tarfile.open(update, "w:gz") as tar:
        info = tarfile.TarInfo("lib/fixed.so")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"fixed\n"))
    result = _run(top, closure, "apply", str(update), "--root", str(root), "--run-dir",
                  str(run_dir))
    assert result.returncode == 0, result.stderr
    assert (root / "usr/lib/fixed.so").read_bytes() == b"fixed\n"
    assert (root / "lib").is_symlink()


def test_the_zip_is_the_same_from_the_same_sources(tmp_path: Path,
                                                   staged: tuple[Path, initramfs.Closure]) -> None:
    top, closure = staged
    again = tmp_path / "again.zip"
    initramfs.write_zip(closure, again)
    assert again.read_bytes() == (top / closure.zip_path.lstrip("/")).read_bytes()


def test_the_wrapper_isolates_the_interpreter() -> None:
    text = initramfs.wrapper("/usr/bin/python3.11")
    assert text.startswith("#!/bin/sh\n")
    assert "export DMOVERLAY_BLOCKDEV=util-linux\n" in text
    assert "exec /usr/bin/python3.11 -I -S -c 'from dmoverlay.cli import main; main()' \"$@\"\n" \
        in text


def test_stage_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        initramfs.stage(tmp_path / "missing")


def test_install_writes_the_module_and_the_conf(tmp_path: Path) -> None:
    moddir, confdir = tmp_path / "modules.d", tmp_path / "conf.d"
    moddir.mkdir()
    confdir.mkdir()
    python = "/opt/it's here/bin/python"
    written = initramfs.install_module(moddir, confdir, python=python)
    module = moddir / initramfs.MODULE
    assert sorted(p.name for p in module.iterdir()) == sorted(
        [*initramfs.MODULE_FILES, "installed.conf"])
    assert all(os.access(module / name, os.X_OK) for name in initramfs.MODULE_FILES)
    assert written[-1] == confdir / initramfs.CONF_NAME
    assert 'add_dracutmodules+=" dmoverlay "' in written[-1].read_text()
    # the conf, read by the shell as dracut reads it, gives the paths back
    out = subprocess.run(["sh", "-c", '. "$1"; printf "%s\\n%s\\n" "$dmoverlay_python" '
                          '"$dmoverlay_path"', "sh", str(module / "installed.conf")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == python
    assert (Path(out[1]) / "dmoverlay" / "boot" / "initramfs.py").is_file()
    again = initramfs.install_module(moddir, None, python=python)  # repeatable, conf left out
    assert confdir / initramfs.CONF_NAME not in again


def test_install_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        initramfs.install_module(tmp_path / "missing", None)
    (tmp_path / "m").mkdir()
    with pytest.raises(UsageError, match="not an absolute path"):
        initramfs.install_module(tmp_path / "m", None, python="python3")
    with pytest.raises(UsageError, match="no such directory"):
        initramfs.install_module(tmp_path / "m", tmp_path / "noconf")
