"""What the initramfs carries of Python: the boot path's closure, the zip,
the wrapper, and the dracut module's installation.  The closure is checked
by running it: a copy of the interpreter beside only the staged zip and the
extension modules listed runs the boot path's commands for real."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import click
import pytest

from dmoverlay.boot import initramfs
from dmoverlay.core.errors import UsageError
from dmoverlay.overlay import cmdline


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, initramfs.Closure]:
    """A prefix holding the interpreter, the staged zip and the listed
    extensions, nothing else: what the initramfs holds of Python."""
    return _prefix(tmp_path_factory.mktemp("prefix"), without_https=False)


def _prefix(top: Path, *, without_https: bool) -> tuple[Path, initramfs.Closure]:
    closure = initramfs.stage(top, without_https=without_https)
    python = top / closure.python.lstrip("/")
    shutil.copy2(closure.python, python)
    for extension in closure.extensions:
        dest = top / extension.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(extension, dest)
    return top, closure


def _run(top: Path, closure: initramfs.Closure, *args: str,
         module: str = "dmoverlay.cli") -> subprocess.CompletedProcess[str]:
    """The staged wrapper's command line (dmoverlay-boot's with `module`
    dmoverlay.boot.hooks), with the staged interpreter."""
    python = top / closure.python.lstrip("/")
    return subprocess.run([str(python), "-I", "-S", "-c",
                           f"from {module} import main; main()", *args],
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
    # what the hooks run: dmoverlay-boot, the same refusal; no updates, nothing said
    hooks = "dmoverlay.boot.hooks"
    by_hook = _run(top, closure, "setup", str(line), str(target), module=hooks)
    assert (by_hook.returncode, by_hook.stderr) == (1, refused.stderr)
    line.write_text("root=live:LABEL=LIVE\n")
    quiet = _run(top, closure, "apply", str(line), str(target), module=hooks)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    wrong = _run(top, closure, "status", module=hooks)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: usage: "), wrong.stderr


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


@pytest.fixture(scope="module")
def staged_without_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, initramfs.Closure]:
    """As `staged`, made as dmoverlay_https=no makes it."""
    return _prefix(tmp_path_factory.mktemp("prefix-no-tls"), without_https=True)


def _links(elf: str) -> str:
    return subprocess.run(["ldd", elf], capture_output=True, text=True, check=True).stdout


def test_without_https_neither_tls_nor_openssl_is_carried(
        staged: tuple[Path, initramfs.Closure],
        staged_without_tls: tuple[Path, initramfs.Closure], tmp_path: Path) -> None:
    """The closure drops ssl, _ssl and _hashlib, so no library it links is
    OpenSSL's; hashlib's own sha256 serves, in silence; an https update is
    one line, and a local one is applied as before."""
    _, full = staged
    top, closure = staged_without_tls
    assert "ssl" in full.pure and "ssl" not in closure.pure
    assert set(full.pure) - set(closure.pure) == {"ssl"}
    dropped = {os.path.basename(e).split(".")[0] for e in set(full.extensions)
               - set(closure.extensions)}
    assert dropped == {"_ssl", "_hashlib"}
    for elf in (closure.python, *closure.extensions):
        assert "libssl" not in _links(elf) and "libcrypto" not in _links(elf), elf
    assert any("libcrypto" in _links(e) for e in full.extensions)
    python = top / closure.python.lstrip("/")
    digest = subprocess.run([str(python), "-I", "-S", "-c",
                             "import hashlib; print(hashlib.sha256(b'x').hexdigest())"],
                            capture_output=True, text=True, check=True)
    assert (digest.stdout.strip(), digest.stderr) == (hashlib.sha256(b"x").hexdigest(), "")
    (tmp_path / "root").mkdir()
    (tmp_path / "run").mkdir()
    refused = _run(top, closure, "apply", "https://127.0.0.1:9/u.img", "--root",
                   str(tmp_path / "root"), "--run-dir", str(tmp_path / "run"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.splitlines()[0] == (
        "error: cannot download https://127.0.0.1:9/u.img: this Python has no TLS (an "
        "initramfs made with dmoverlay_https=no)")
    update = tmp_path / "u.tar.gz"
    with tarfile.open(update, "w:gz") as tar:
        info = tarfile.TarInfo("fixed")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"fixed\n"))
    done = _run(top, closure, "apply", str(update), "--root", str(tmp_path / "root"),
                "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0 and (tmp_path / "root/fixed").read_bytes() == b"fixed\n"


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


def test_the_stage_holds_both_wrappers(staged: tuple[Path, initramfs.Closure]) -> None:
    """dmoverlay, the whole command line, and dmoverlay-boot, which the
    hooks run: the same interpreter, isolated, without click."""
    top, closure = staged
    for where, module in ((initramfs.WRAPPER, "dmoverlay.cli"),
                          (initramfs.BOOT_WRAPPER, "dmoverlay.boot.hooks")):
        path = top / where.lstrip("/")
        assert path.stat().st_mode & 0o777 == 0o755
        assert path.read_text() == initramfs.wrapper(closure.python, module)
        assert f"-I -S -c 'from {module} import main; main()' \"$@\"\n" in path.read_text()


def test_the_hooks_run_dmoverlay_boot() -> None:
    """The two commands of the hooks, each as its dmoverlay-boot form."""
    here = Path(initramfs.__file__).parent / "dracut"
    setup = (here / "dmoverlay-setup.sh").read_text()
    updates = (here / "dmoverlay-updates.sh").read_text()
    assert 'dmoverlay-boot setup /run/dmoverlay.cmdline "$NEWROOT"' in setup
    assert 'dmoverlay_run dmoverlay-boot apply /run/dmoverlay.cmdline "$NEWROOT"' in updates
    for text in (setup, updates):
        commands = [line for line in text.splitlines()
                    if "dmoverlay " in line and not line.lstrip().startswith(("#", "info", "die"))]
        assert commands == [], commands


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


def test_the_wrapper_runs_a_python_whose_path_has_spaces_and_quotes(tmp_path: Path) -> None:
    """The interpreter's path is one word to the shell, whatever it holds."""
    where = tmp_path / "it's a \"dir\" $HOME `x` \\ \n"
    where.mkdir()
    python = where / "python"
    python.write_text('#!/bin/sh\nprintf "%s|" "$0" "$@"\n')
    python.chmod(0o755)
    wrapper = tmp_path / "dmoverlay"
    wrapper.write_bytes(initramfs.wrapper(str(python)).encode())
    out = subprocess.run(["sh", str(wrapper), "setup", "a b"], capture_output=True, text=True,
                         check=True).stdout
    assert out == f"{python}|-I|-S|-c|from dmoverlay.cli import main; main()|setup|a b|"


def test_the_conf_gives_back_every_byte_of_a_path(tmp_path: Path) -> None:
    """installed.conf, sourced by the shell, gives the paths back as they
    were: quotes, newlines, backslashes, `$`, backticks, bytes not UTF-8."""
    moddir = tmp_path / "modules.d"
    moddir.mkdir()
    weird = "".join(chr(c) for c in range(1, 128)) + os.fsdecode(b"\xff\xfe")
    python = "/opt/" + weird.replace("/", "") + "/python"
    initramfs.install_module(moddir, None, python=python)
    out = subprocess.run(["sh", "-c", '. "$1"; printf "%s" "$dmoverlay_python"', "sh",
                          str(moddir / initramfs.MODULE / "installed.conf")],
                         capture_output=True, check=True).stdout
    assert out == os.fsencode(python)


def test_install_checks_the_conf_dir_before_writing_anything(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(UsageError, match="no such directory"):
        initramfs.install_module(tmp_path / "m", tmp_path / "noconf")
    assert not (tmp_path / "m" / initramfs.MODULE).exists()


def test_install_does_not_write_through_a_planted_link(tmp_path: Path) -> None:
    """The module is run by dracut as root: a link in its place is not
    followed to wherever it points."""
    moddir, elsewhere = tmp_path / "modules.d", tmp_path / "elsewhere"
    moddir.mkdir()
    elsewhere.mkdir()
    (moddir / initramfs.MODULE).symlink_to(elsewhere)
    with pytest.raises(UsageError, match="not a directory") as caught:
        initramfs.install_module(moddir, None, python="/usr/bin/python3")
    assert caught.value.hint
    assert list(elsewhere.iterdir()) == []
    assert (moddir / initramfs.MODULE).is_symlink()


@pytest.mark.parametrize("what", ["file", "open dir", "foreign dir"])
def test_install_refuses_what_is_in_the_module_s_place(tmp_path: Path, what: str) -> None:
    moddir = tmp_path / "modules.d"
    moddir.mkdir()
    module = moddir / initramfs.MODULE
    if what == "file":
        module.write_text("x")
    else:
        module.mkdir()
        if what == "open dir":
            module.chmod(0o777)
        else:
            os.chown(module, 12345, 12345)
    with pytest.raises(UsageError, match=initramfs.MODULE):
        initramfs.install_module(moddir, None, python="/usr/bin/python3")
    if what != "file":
        assert list(module.iterdir()) == []


@pytest.mark.parametrize("name", ["installed.conf", ".installed.conf.tmp", "module-setup.sh"])
def test_install_says_so_when_a_file_cannot_be_written(tmp_path: Path, name: str) -> None:
    """A directory where a file goes: one error naming it, no traceback,
    and no temporary file left."""
    moddir = tmp_path / "modules.d"
    (moddir / initramfs.MODULE / name).mkdir(parents=True)
    with pytest.raises(UsageError, match=name.lstrip(".").removesuffix(".tmp")):
        initramfs.install_module(moddir, None, python="/usr/bin/python3")
    assert not [p for p in (moddir / initramfs.MODULE).iterdir()
                if p.name.endswith(".tmp") and p.is_file()]


def test_the_closure_is_the_same_wherever_and_however_it_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dracut runs the module's install from wherever `dracut -f` was
    typed, with the caller's environment: a module there by a standard
    library name, or one on PYTHONPATH, is neither run nor carried."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "env").mkdir()
    for where in ("cwd", "env"):
        for name in ("difflib", "textwrap", "json"):
            (tmp_path / where / f"{name}.py").write_text(
                f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    clean = initramfs.collect_fresh()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "env"))
    assert initramfs.collect_fresh() == clean
    assert not (tmp_path / "ran").exists()
    assert not [f for f in clean.pure.values() if f.startswith(str(tmp_path))]


_DRACUT_STUBS = """
log() { printf '%s\\0' "$@" >> "$LOG"; printf '\\n\\0' >> "$LOG"; }
inst_library() { log lib "$@"; }
inst_binary() { log bin "$@"; }
inst_simple() { log simple "$@"; }
inst_multiple() { :; }
inst_hook() { log hook "$@"; }
derror() { log derror "$@"; }
dfatal() { log dfatal "$@"; }
"""


def test_module_setup_installs_the_stage_from_anywhere(tmp_path: Path) -> None:
    """module-setup.sh's install(), run by bash as dracut runs it (its
    inst_* recorded), from a directory holding a `json.py` and with a
    staging directory whose path has a space and a quote: the staged
    files go in under their own names, and nothing in the caller's
    directory is run."""
    moddir = tmp_path / "modules.d"
    moddir.mkdir()
    initramfs.install_module(moddir, None, python=sys.executable)
    module = moddir / initramfs.MODULE
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "dracut's tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    (cwd / "json.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    log = tmp_path / "log"
    script = (_DRACUT_STUBS + '. "$moddir/module-setup.sh"\n'
              "install\n")
    result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                            check=False, timeout=120,
                            env={"PATH": os.environ["PATH"], "LOG": str(log),
                                 "moddir": str(module), "DRACUT_TMPDIR": str(tmpdir)})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ran").exists()
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c]
    stage = tmpdir / "dmoverlay-stage"
    simple = {c[2]: c[1] for c in calls if c[0] == "simple"}
    closure = initramfs.collect_fresh()
    assert simple == {initramfs.WRAPPER: f"{stage}{initramfs.WRAPPER}",
                      initramfs.BOOT_WRAPPER: f"{stage}{initramfs.BOOT_WRAPPER}",
                      closure.zip_path: f"{stage}{closure.zip_path}",
                      "/lib/dmoverlay-lib.sh": f"{module}/dmoverlay-lib.sh"}
    assert ["bin", closure.python] in calls
    assert {c[1] for c in calls if c[0] == "lib"} >= set(closure.extensions)
    assert [c[1] for c in calls if c[0] == "hook"] == [
        "cmdline", "pre-mount", "pre-pivot", "shutdown"]


def test_module_setup_stops_dracut_when_its_python_is_gone(tmp_path: Path) -> None:
    """The Python recorded at install time removed since: dracut must fail,
    not make an initramfs without the module (a live root would then not
    boot, and nothing would say so until the next boot)."""
    moddir = tmp_path / "modules.d"
    moddir.mkdir()
    initramfs.install_module(moddir, None, python=str(tmp_path / "gone" / "python3"))
    log = tmp_path / "log"
    script = _DRACUT_STUBS + '. "$moddir/module-setup.sh"\ninstall\necho "went on"\n'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            check=False, timeout=60,
                            env={"PATH": os.environ["PATH"], "LOG": str(log),
                                 "moddir": str(moddir / initramfs.MODULE),
                                 "DRACUT_TMPDIR": str(tmp_path)})
    assert result.returncode == 1 and "went on" not in result.stdout
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c]
    assert [c[0] for c in calls] == ["dfatal"], calls
    assert "could not stage dmoverlay's Python" in " ".join(calls[0][1:])
    assert "90-dmoverlay.conf" in " ".join(calls[0][1:])


@pytest.mark.parametrize(("value", "tls"), [("yes", True), ("", True), ("no", False),
                                           ("false", None)])
def test_module_setup_leaves_tls_out_when_dracut_conf_says_no(
        tmp_path: Path, value: str, tls: bool | None) -> None:
    """dracut.conf's dmoverlay_https=no stages without TLS: _ssl is not among
    the libraries installed; a value other than yes or no stops dracut."""
    moddir = tmp_path / "modules.d"
    moddir.mkdir()
    initramfs.install_module(moddir, None, python=sys.executable)
    log = tmp_path / "log"
    script = _DRACUT_STUBS + '. "$moddir/module-setup.sh"\ninstall\n'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            check=False, timeout=120,
                            env={"PATH": os.environ["PATH"], "LOG": str(log),
                                 "moddir": str(moddir / initramfs.MODULE),
                                 "DRACUT_TMPDIR": str(tmp_path), "dmoverlay_https": value})
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c]
    if tls is None:
        assert result.returncode == 1
        assert calls == [["dfatal", f"dmoverlay: dmoverlay_https={value}: say yes or no"]]
        return
    assert result.returncode == 0, result.stderr
    libs = [c[1] for c in calls if c[0] == "lib"]
    assert any("/_json." in lib for lib in libs)
    assert any("/_ssl." in lib for lib in libs) is tls


def test_install_writes_into_the_directory_it_checked(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's directory swapped for a link after it was checked:
    the files still go into the directory checked, not through the link."""
    moddir, elsewhere = tmp_path / "modules.d", tmp_path / "elsewhere"
    moddir.mkdir()
    elsewhere.mkdir()
    checked = initramfs._module_dir

    def then_swapped(target: Path) -> object:
        result = checked(target)
        target.rename(tmp_path / "moved")
        target.symlink_to(elsewhere)
        return result

    monkeypatch.setattr(initramfs, "_module_dir", then_swapped)
    initramfs.install_module(moddir, None, python="/usr/bin/python3")
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == sorted(
        [*initramfs.MODULE_FILES, initramfs.INSTALLED])


def test_an_installed_dmoverlay_s_closure_takes_the_standard_library_first(
        tmp_path: Path) -> None:
    """dmoverlay installed in site-packages: that directory is on the path
    already, after the standard library, and stays there; a module in it
    by a standard library name (a stale backport) is not carried."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    shutil.copytree(Path(initramfs.__file__).parents[1], site / "dmoverlay")
    (site / "textwrap.py").write_text("raise SystemExit('the stale backport')\n")
    click_dir = Path(click.__file__).parents[1]
    (site / "deps.pth").write_text(f"{click_dir}\n")
    result = subprocess.run([str(python), "-c", "from dmoverlay.boot import initramfs; "
                             "print(initramfs.collect_fresh().pure['textwrap'])"],
                            capture_output=True, text=True, check=False, timeout=120, cwd="/",
                            env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == textwrap.__file__


def test_install_says_so_when_the_conf_dir_goes_away(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    moddir, confdir = tmp_path / "modules.d", tmp_path / "conf.d"
    moddir.mkdir()
    confdir.mkdir()
    checked = initramfs._module_dir

    def then_gone(target: Path) -> object:
        confdir.rmdir()
        return checked(target)

    monkeypatch.setattr(initramfs, "_module_dir", then_gone)
    with pytest.raises(UsageError, match=r"conf\.d: cannot write into it"):
        initramfs.install_module(moddir, confdir, python="/usr/bin/python3")


def test_the_command_line_leaves_out_the_comments_of_conf_files(tmp_path: Path) -> None:
    """dracut joins every line of /etc/cmdline.d/*.conf into the command line,
    comments too: a double quote in one ran on into the kernel's options,
    and setup refused the whole line ("a double quote is not closed")."""
    (tmp_path / "etc/cmdline.d").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    (tmp_path / "etc/cmdline.d/10-live.conf").write_text(
        '# the "live medium\n  # indented too\nrd.live.overlay.size=64\n\nrd.live.dir=Live')
    (tmp_path / "etc/cmdline").write_text("rd.live.ram\n")
    (tmp_path / "proc/cmdline").write_text('root=live:LABEL="MY LIVE" quiet\n')
    lib = Path(initramfs.__file__).parent / "dracut" / "dmoverlay-lib.sh"
    out = subprocess.run(["sh", "-c", f'. "{lib}" && dmoverlay_cmdline "$1"', "sh",
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["rd.live.overlay.size=64", "rd.live.dir=Live", "rd.live.ram",
                                'root=live:LABEL="MY LIVE" quiet']
    boot = cmdline.parse(out)
    with pytest.raises(UsageError, match="double quote is not closed"):  # as getcmdline joins it
        cmdline.parse(" ".join(p.read_text() for p in (
            tmp_path / "etc/cmdline.d/10-live.conf", tmp_path / "etc/cmdline",
            tmp_path / "proc/cmdline")))
    assert (boot.overlay_size, boot.live_dir, boot.ram) == (64 << 20, "Live", True)
    assert boot.root == "LABEL=MY LIVE"


@pytest.mark.parametrize(("code", "said"), [(0, "info"), (3, "warn")])
def test_the_hooks_say_each_line_through_dracut(code: int, said: str) -> None:
    """What a command the hooks run prints, each line through dracut's info
    (it succeeded) or warn (it failed), with its exit status kept."""
    lib = Path(initramfs.__file__).parent / "dracut" / "dmoverlay-lib.sh"
    script = (f'. "{lib}"; info() {{ echo "info $*"; }}; warn() {{ echo "warn $*"; }}; '
              f'dmoverlay_run sh -c "echo one; echo; echo two >&2; exit {code}"; echo "rc=$?"')
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == [f"{said} dmoverlay: one", f"{said} dmoverlay: two",
                                f"rc={code}"]
