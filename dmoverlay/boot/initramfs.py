"""What an initramfs needs of Python to run dmoverlay, and nothing more.

The boot path (setup from the kernel command line, the updates, teardown,
status) is imported in a fresh interpreter together with every module its
code imports, even inside functions; what that loads is the closure.  Its
pure-Python part goes into one zip of bytecode without sources, which the
interpreter finds by itself: `<prefix>/lib/python3X.zip` is on the default
sys.path of every CPython, before the standard library directory.  Compiled
extensions (lib-dynload) and the interpreter go in as files, for dracut to
install with the libraries they link.

Not carried: libblockdev's gi binding (setup uses util-linux's losetup and
mount in the initramfs), pyparted, and the build job.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import marshal
import os
import pkgutil
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core.errors import UsageError

# What the boot path reaches.  Everything under these is imported, and every
# import written in it followed.
BOOT_PACKAGES = ("dmoverlay.core", "dmoverlay.overlay", "dmoverlay.apply", "dmoverlay.boot",
                 # click imports its own modules lazily (help, errors, prompts)
                 "click")
BOOT_MODULES = ("dmoverlay", "dmoverlay.cli", "dmoverlay.cli.options",
                "dmoverlay.cli.overlay", "dmoverlay.cli.apply")
# Never carried: the host side of this module, libblockdev's binding and
# pyparted (setup falls back to util-linux), and what only the tests use.
LEFT_OUT = ("dmoverlay.boot.initramfs", "dmoverlay.cli.initramfs",
            "dmoverlay.overlay.libblockdev",
            "gi", "parted", "_parted", "pytest", "hypothesis",
            "site", "sitecustomize", "_sitebuiltins", "_distutils_hack", "__editable__")
# The standard library imports some modules lazily, where no import
# statement of ours names them: the codecs of the console and the
# filesystem, and what tarfile and shutil reach for when they need it.
STDLIB_LAZY = ("encodings.utf_8", "encodings.latin_1", "encodings.ascii", "encodings.idna",
               "gzip", "bz2", "lzma", "zlib", "pwd", "grp", "_compat_pickle",
               "difflib", "textwrap")

WRAPPER = "/usr/bin/dmoverlay"
# What the dracut hooks run: their two commands without click (boot.hooks).
BOOT_WRAPPER = "/usr/bin/dmoverlay-boot"


@dataclass(frozen=True)
class Closure:
    """The modules the boot path loads: pure ones by name and source file,
    extensions by file; and the interpreter."""

    python: str
    pure: dict[str, str]  # module name -> its .py file
    packages: frozenset[str]  # which of `pure` are packages (an __init__)
    extensions: tuple[str, ...]
    zip_path: str  # where the interpreter looks for its zip

    def to_dict(self) -> dict[str, object]:
        return {"python": self.python, "pure": self.pure, "packages": sorted(self.packages),
                "extensions": list(self.extensions), "zip_path": self.zip_path}


def _imports_in(path: str, module: str, is_package: bool) -> set[str]:
    """Every absolute module name a source file imports, anywhere in it."""
    tree = ast.parse(Path(path).read_bytes(), path)
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _left_out(name: str) -> bool:
    return any(name == x or name.startswith((x + ".", x + "_")) for x in LEFT_OUT)


def _load_boot_path() -> None:
    """Import the boot path and what its code names, to a fixed point."""
    names = set(BOOT_MODULES) | set(STDLIB_LAZY)
    for package in BOOT_PACKAGES:
        names.add(package)
        module = importlib.import_module(package)
        names.update(info.name for info in pkgutil.walk_packages(module.__path__, package + "."))
    done: set[str] = set()
    while names - done:
        for name in sorted(names - done):
            done.add(name)
            if _left_out(name):
                continue
            try:
                module = importlib.import_module(name)
            except Exception:
                continue  # `from x import function`, an optional module, another OS's
            file = getattr(module, "__file__", None)
            if name.startswith("dmoverlay") and file:
                names |= _imports_in(file, name, hasattr(module, "__path__"))


# Left out with `without_https`: TLS, and OpenSSL's hashes (hashlib has its
# own sha256), so that libssl and libcrypto (5.4 MiB) stay out too.
TLS = ("ssl", "_ssl", "_hashlib")


def collect(*, without_https: bool = False) -> Closure:
    """The closure of the boot path in this interpreter (run it fresh:
    whatever else was imported before would be carried too); without TLS,
    as if it were not installed (urllib and hashlib do without it)."""
    os.environ["DMOVERLAY_BLOCKDEV"] = "util-linux"
    if without_https:
        for name in TLS:
            sys.modules[name] = None  # type: ignore[assignment]  # import fails: "not there"
    _load_boot_path()
    pure: dict[str, str] = {}
    packages: set[str] = set()
    extensions: set[str] = set()
    for name, module in sorted(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or _left_out(name):
            continue  # built in, frozen, or a namespace
        if file.endswith(".py"):
            pure[name] = file
            if hasattr(module, "__path__"):
                packages.add(name)
        elif file.endswith(".so"):
            extensions.add(os.path.realpath(file))
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    return Closure(os.path.realpath(sys.executable), pure, frozenset(packages),
                   tuple(sorted(extensions)),
                   os.path.join(sys.base_prefix, "lib", f"python{version}.zip"))


# Run by collect_fresh: the path without the current directory (which `-c`
# puts first), and dmoverlay's own directory first unless it is on the path
# already (site-packages, after the standard library: it stays there).
_FRESH = ("import os, sys; d = sys.argv[1]; sys.path = [p for p in sys.path if p]\n"
          "if d not in map(os.path.realpath, sys.path): sys.path.insert(0, d)\n"
          "import json, dmoverlay.boot.initramfs as i\n"
          "print(json.dumps(i.collect(without_https=sys.argv[2] == 'no').to_dict()))\n")


def collect_fresh(python: str = sys.executable, *, without_https: bool = False) -> Closure:
    """collect() in a new interpreter, with nothing else imported.  Neither
    the current directory nor the caller's PYTHONPATH and other PYTHON*
    variables (-E) can put a module of theirs (a `json.py`, say) in place
    of the one the boot path imports; this dmoverlay is found where it is
    (_FRESH).  The site-packages, the user's too, are the interpreter's."""
    package_dir = os.fspath(Path(__file__).resolve().parents[2])
    result = subprocess.run([python, "-E", "-c", _FRESH, package_dir,
                             "no" if without_https else "yes"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise UsageError(f"{python} could not list the boot path's modules: {lines[-1]}")
    data = json.loads(result.stdout)
    return Closure(data["python"], data["pure"], frozenset(data["packages"]),
                   tuple(data["extensions"]), data["zip_path"])


# 1980-01-01, zip's first date: the same bytes from the same sources.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def pyc(source: bytes, filename: str) -> bytes:
    """Bytecode as the interpreter caches it, with no source to check
    against: zipimport then takes it as it is."""
    code = compile(source, filename, "exec", dont_inherit=True)
    header = importlib.util.MAGIC_NUMBER + bytes(12)  # flags, mtime, size: none
    return header + marshal.dumps(code)


def write_zip(closure: Closure, dest: Path) -> int:
    """The pure modules, as bytecode, in the zip the interpreter looks for;
    returns its size.  Stored, not deflated: dracut compresses the whole
    initramfs anyway (to the same size), and an import then inflates
    nothing (the command's start-up: 79 ms here against 99 ms deflated)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, file in sorted(closure.pure.items()):
            parts = name.split(".")
            arc = "/".join([*parts, "__init__.pyc"] if name in closure.packages
                           else [*parts[:-1], parts[-1] + ".pyc"])
            info = zipfile.ZipInfo(arc, _ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, pyc(Path(file).read_bytes(), file))
    os.replace(tmp, dest)
    return dest.stat().st_size


def wrapper(python: str, module: str = "dmoverlay.cli") -> str:
    """/usr/bin/dmoverlay in the initramfs (or, with `module`
    dmoverlay.boot.hooks, dmoverlay-boot): the interpreter isolated from the
    environment and site-packages, with util-linux for loop devices."""
    python = shlex.quote(python)  # one word, whatever the path holds
    return (f"#!/bin/sh\n"
            f"# dmoverlay in the initramfs (written by `dmoverlay initramfs stage`)\n"
            f"export DMOVERLAY_BLOCKDEV=util-linux\n"
            f"exec {python} -I -S -c 'from {module} import main; main()' \"$@\"\n")


def stage(dest: Path, python: str = sys.executable, *, without_https: bool = False) -> Closure:
    """Write what the initramfs gets under `dest` (a staging root): the zip
    and the wrappers (dmoverlay, and the hooks' dmoverlay-boot).  The
    interpreter and extensions are listed by `files`, for dracut to install
    with their libraries.  `without_https`: no TLS (TLS)."""
    if not dest.is_dir():
        raise UsageError(f"{dest}: no such directory")
    closure = collect_fresh(python, without_https=without_https)
    zip_dest = dest / closure.zip_path.lstrip("/")
    zip_dest.parent.mkdir(parents=True, exist_ok=True)
    write_zip(closure, zip_dest)
    for where, module in ((WRAPPER, "dmoverlay.cli"), (BOOT_WRAPPER, "dmoverlay.boot.hooks")):
        path = dest / where.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.fsencode(wrapper(closure.python, module)))
        path.chmod(0o755)
    return closure


# ------------------------------------------------------- the dracut module

MODULE = "90dmoverlay"
MODULE_FILES = ("module-setup.sh", "dmoverlay-cmdline.sh", "dmoverlay-setup.sh",
                "dmoverlay-updates.sh", "dmoverlay-lib.sh", "dmoverlay-shutdown.sh")
DRACUT_MODULES = Path("/usr/lib/dracut/modules.d")
DRACUT_CONF = Path("/etc/dracut.conf.d")
CONF_NAME = "90-dmoverlay.conf"
INSTALLED = "installed.conf"  # in the module: where the Python and the package are


def _shell_word(text: str) -> str:
    """One word to the shell, whatever the text holds (no NUL: a path has none)."""
    return "'" + text.replace("'", "'\\''") + "'"


def install_module(moddir: Path = DRACUT_MODULES, confdir: Path | None = DRACUT_CONF,
                   python: str = sys.executable) -> list[Path]:
    """Install the dracut module (and, with `confdir`, the dracut.conf.d
    snippet that adds it to every initramfs in place of dmsquash-live);
    returns what was written.  Each file is written whole, then renamed."""
    if not moddir.is_dir():
        raise UsageError(f"{moddir}: no such directory",
                         hint="is dracut installed? (apt-get install dracut-core)")
    if not os.path.isabs(python):
        raise UsageError(f"{python!r}: not an absolute path to a Python")
    if confdir is not None and not confdir.is_dir():
        raise UsageError(f"{confdir}: no such directory", hint="give --confdir")
    here = Path(__file__).resolve().parent / "dracut"
    target = moddir / MODULE
    package_dir = Path(__file__).resolve().parents[2]
    conf = (f"# written by `dmoverlay initramfs install`: the Python, and where the\n"
            f"# dmoverlay package it installs from is\n"
            f"dmoverlay_python={_shell_word(python)}\n"
            f"dmoverlay_path={_shell_word(os.fspath(package_dir))}\n")
    files = [(name, (here / name).read_bytes(), 0o755) for name in MODULE_FILES]
    files.append((INSTALLED, os.fsencode(conf), 0o644))
    written = []
    dir_fd = _module_dir(target)
    try:
        for name, data, mode in files:
            written.append(_write(dir_fd, target / name, data, mode))
    finally:
        os.close(dir_fd)
    if confdir is not None:
        snippet = ("# written by `dmoverlay initramfs install`: dmoverlay sets up the live\n"
                   "# root (root=live:..., rd.live.*) in place of dmsquash-live\n"
                   'add_dracutmodules+=" dmoverlay "\n'
                   'omit_dracutmodules+=" dmsquash-live "\n')
        try:
            dir_fd = os.open(confdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"{confdir}: cannot write into it: {exc.strerror}",
                             hint="give --confdir, or --no-conf") from exc
        try:
            written.append(_write(dir_fd, confdir / CONF_NAME, snippet.encode(), 0o644))
        finally:
            os.close(dir_fd)
    return written


def _module_dir(target: Path) -> int:
    """The module's directory, made if missing, opened: what is written
    goes into the directory checked here, whatever is renamed meanwhile.
    dracut runs what is in it as root: a link there (to anywhere) is not
    written through, and a directory another user owns or others may
    write into is not trusted."""
    try:
        os.mkdir(target, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"{target}: cannot make it: {exc.strerror}") from exc
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{target}: not a directory (a link or a file is in its place)",
                         hint="remove it, then install again") from exc
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise UsageError(f"{target}: owned by another user or writable by others",
                         hint="remove it, then install again")
    return fd


def _write(dir_fd: int, path: Path, data: bytes, mode: int) -> Path:
    """`path` (shown in messages) written whole as its name in `dir_fd`,
    then renamed over what was there."""
    tmp = f".{path.name}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):  # left by an install cut short
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), mode)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            os.unlink(tmp, dir_fd=dir_fd)
            raise
    except OSError as exc:
        raise UsageError(f"{path}: cannot write it: {exc.strerror}",
                         hint="a directory or something else in its way? remove it") from exc
    return path
