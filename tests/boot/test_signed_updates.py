"""Signed updates at boot: the keys the initramfs holds (put there by the
dracut module from dracut.conf's dmoverlay_updates_keys=) or the command
line names (rd.live.updates.verify=) make every update need a good
signature; one without is left out and the boot goes on."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.apply.update import ApplyOptions
from dmoverlay.boot import initramfs, updates
from dmoverlay.core import signature
from dmoverlay.core.errors import KeysError, UsageError
from dmoverlay.overlay import cmdline
from tests.applykit import make_root, snapshot
from tests.boot.test_updates import make_tar
from tests.conftest import dmoverlay, small_tmpfs
from tests.signkit import KeyPair, two_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    return two_keys(tmp_path_factory)


@pytest.fixture
def live(tmp_path: Path) -> tuple[ApplyOptions, Path]:
    root, run = make_root(tmp_path / "live")
    mounts = tmp_path / "state"
    mounts.mkdir(mode=0o700)
    return ApplyOptions(root=root, run_dir=run), mounts


def line_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cmdline"
    path.write_text(text)
    return os.fspath(path)


# ---------------------------------------------------------------- which keys


def test_no_keys_asked_for_none_used(tmp_path: Path) -> None:
    assert updates.boot_trust(line_file(tmp_path, "rd.live.updates=/u.img"),
                              keys=tmp_path / "none", revoked=tmp_path / "none") is None


def test_the_command_line_names_the_keys(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    path = line_file(tmp_path, f"root=live:LABEL=L rd.live.updates=/u.img "
                               f"rd.live.updates.verify={keys['alice'].public} "
                               f"rd.live.updates.revoked={keys['mallory'].public}")
    trust = updates.boot_trust(path, keys=tmp_path / "none")
    assert trust is not None and trust.keys == os.fspath(keys["alice"].public)
    assert trust.revoked == keys["mallory"].public
    # and setup, which reads the same line, knows the keys
    assert cmdline.parse(Path(path).read_text()).updates_keys == os.fspath(
        keys["alice"].public)


def test_keys_in_the_initramfs_are_required_whatever_the_line_says(
        tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    baked, revoked = tmp_path / "updates.keys", tmp_path / "updates.revoked"
    baked.write_text(keys["alice"].line() + "\n")
    trust = updates.boot_trust(line_file(tmp_path, "rd.live.updates=/u.img"), keys=baked,
                               revoked=revoked)
    assert trust is not None and trust.keys == os.fspath(baked) and trust.revoked is None
    revoked.write_text(keys["mallory"].line() + "\n")
    trust = updates.boot_trust(line_file(tmp_path, "rd.live.updates=/u.img"), keys=baked,
                               revoked=revoked)
    assert trust is not None and trust.revoked == revoked
    # the line named the revoked list as the keys to trust (mallory's then
    # verified), or another revoked list (mallory's let back in): no update
    for line in (f"rd.live.updates.verify={revoked}",
                 f"rd.live.updates.verify={baked} rd.live.updates.revoked={baked}.none",
                 f"rd.live.updates.revoked={keys['alice'].public}"):
        with pytest.raises(KeysError, match="which the command line cannot replace"):
            updates.boot_trust(line_file(tmp_path, f"rd.live.updates=/u.img {line}"),
                               keys=baked, revoked=revoked)


def test_the_line_cannot_replace_the_initramfs_keys(tmp_path: Path,
                                                   keys: dict[str, KeyPair]) -> None:
    """rd.live.updates.verify= naming a file of mallory's (on the medium,
    say) would make her updates good on a machine whose initramfs trusts
    alice only: all updates are left out instead."""
    baked = tmp_path / "updates.keys"
    baked.write_text(keys["alice"].line() + "\n")
    line = f"rd.live.updates=/u.img rd.live.updates.verify={keys['mallory'].public}"
    with pytest.raises(KeysError) as caught:
        updates.boot_trust(line_file(tmp_path, line), keys=baked, revoked=tmp_path / "none")
    assert caught.value.message == (
        f"kernel command line: rd.live.updates.verify={keys['mallory'].public}: the "
        f"initramfs holds {baked}, which the command line cannot replace")
    # naming the initramfs's own file is no change
    trust = updates.boot_trust(line_file(tmp_path, f"rd.live.updates=/u.img "
                                                   f"rd.live.updates.verify={baked}"),
                               keys=baked, revoked=tmp_path / "none")
    assert trust is not None and trust.keys == os.fspath(baked)


def test_the_line_cannot_empty_the_initramfs_revoked_keys(tmp_path: Path,
                                                          keys: dict[str, KeyPair]) -> None:
    baked, revoked = tmp_path / "updates.keys", tmp_path / "updates.revoked"
    baked.write_text(keys["alice"].line() + "\n" + keys["mallory"].line() + "\n")
    revoked.write_text(keys["mallory"].line() + "\n")
    empty = tmp_path / "empty"
    empty.write_text("")
    line = f"rd.live.updates=/u.img rd.live.updates.revoked={empty}"
    with pytest.raises(KeysError, match=r"rd\.live\.updates\.revoked=.* cannot replace"):
        updates.boot_trust(line_file(tmp_path, line), keys=baked, revoked=revoked)


def test_the_line_may_revoke_more_than_an_initramfs_without_revoked_keys(
        tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    baked = tmp_path / "updates.keys"
    baked.write_text(keys["alice"].line() + "\n")
    line = f"rd.live.updates=/u.img rd.live.updates.revoked={keys['alice'].public}"
    trust = updates.boot_trust(line_file(tmp_path, line), keys=baked,
                               revoked=tmp_path / "none")
    assert trust is not None and trust.revoked == keys["alice"].public


@pytest.mark.parametrize(("line", "error", "words"), [
    ("rd.live.updates.verify=etc/keys", UsageError, "not an absolute path"),
    ("rd.live.updates.verify=", UsageError, "needs a value"),
    ("rd.live.updates.revoked=/etc/r", UsageError, "revoked= without keys"),
    ("rd.live.updates.verify=/nonexistent/keys", KeysError, "cannot read /nonexistent/keys"),
])
def test_keys_the_line_names_that_cannot_be_used(tmp_path: Path, line: str,
                                                 error: type[Exception], words: str) -> None:
    with pytest.raises(error) as caught:
        updates.boot_trust(line_file(tmp_path, line), keys=tmp_path / "none")
    assert words in str(caught.value)


# ---------------------------------------------------------------- applied at boot


@pytest.fixture
def medium(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with small_tmpfs(tmp_path / "medium", "size=8m,mode=0755") as where:
        yield where


@pytest.mark.root
def test_signed_applied_unsigned_and_tampered_left_out(
        live: tuple[ApplyOptions, Path], medium: Path, keys: dict[str, KeyPair]) -> None:
    options, mounts = live
    make_tar(medium / "one.tar", {"lib/one.so": b"one\n"})
    signature.sign(medium / "one.tar", keys["alice"].private)
    make_tar(medium / "unsigned.tar", {"lib/libfoo.so": b"evil\n"})
    make_tar(medium / "changed.tar", {"lib/libfoo.so": b"good\n"})
    signature.sign(medium / "changed.tar", keys["alice"].private)
    make_tar(medium / "changed.tar", {"lib/libfoo.so": b"evil\n"})
    trust = signature.load_trust(keys["alice"].public)
    outcomes = updates.apply_all(("/one.tar", "/unsigned.tar", "/changed.tar"), options,
                                 mounts=mounts, medium=os.fspath(medium), trust=trust)
    assert [o.applied for o in outcomes] == [True, False, False]
    assert "not signed" in outcomes[1].reason
    assert "does not match its signature" in outcomes[2].reason
    assert (options.root / "usr/lib/one.so").read_bytes() == b"one\n"
    assert (options.root / "usr/lib/libfoo.so").read_bytes() == b"old libfoo\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "www"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()


def test_from_cmdline_verifies_with_the_keys_the_line_names(
        tmp_path: Path, keys: dict[str, KeyPair], server: tuple[str, Path]) -> None:
    """`dmoverlay apply --from-cmdline`, as the pre-pivot hook runs it: the
    signed update applied, the unsigned one left out with its reason."""
    base, served = server
    root, run = make_root(tmp_path / "live")
    make_tar(served / "good.tar", {"etc/good": b"1\n"})
    signature.sign(served / "good.tar", keys["alice"].private)
    make_tar(served / "bad.tar", {"etc/bad": b"1\n"})
    signature.sign(served / "bad.tar", keys["mallory"].private)
    line = line_file(tmp_path, f"rd.live.updates={base}/good.tar "
                               f"rd.live.updates={base}/bad.tar "
                               f"rd.live.updates.verify={keys['alice'].public}")
    result = dmoverlay("apply", "--from-cmdline", line, "--root", str(root),
                       "--run-dir", str(run), "--state-dir", str(run / "dmoverlay"))
    assert result.returncode == 1, result.stderr
    assert (root / "etc/good").read_bytes() == b"1\n"
    assert not (root / "etc/bad").exists()
    assert f"warning: left out {base}/bad.tar: {base}/bad.tar: signed by ED25519 key" \
           in result.stderr


def test_from_cmdline_with_keys_that_cannot_be_read_applies_nothing(
        tmp_path: Path, server: tuple[str, Path]) -> None:
    base, served = server
    root, run = make_root(tmp_path / "live")
    make_tar(served / "u.tar", {"etc/new": b"1\n"})
    line = line_file(tmp_path, f"rd.live.updates={base}/u.tar "
                               "rd.live.updates.verify=/nonexistent/keys")
    before = snapshot(root)
    result = dmoverlay("apply", "--from-cmdline", line, "--root", str(root),
                       "--run-dir", str(run), "--state-dir", str(run / "dmoverlay"))
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: all 1 updates left out: cannot read /nonexistent/keys: "
                      "No such file or directory"]
    assert snapshot(root) == before


# ---------------------------------------------------------------- the dracut module


_STUBS = """
log() { printf '%s\\0' "$@" >> "$LOG"; printf '\\n\\0' >> "$LOG"; }
inst_binary() { log bin "$@"; [ -z "$NO_BINARY" ]; }
inst_simple() { log simple "$@"; }
inst_multiple() { log multiple "$@"; }
dfatal() { log dfatal "$@"; }
"""


def _module_setup(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[list[str]]]:
    moddir = tmp_path / "modules.d"
    moddir.mkdir(exist_ok=True)
    initramfs.install_module(moddir, None, python="/usr/bin/python3")
    log = tmp_path / "log"
    log.unlink(missing_ok=True)
    log.touch()
    script = _STUBS + '. "$moddir/module-setup.sh"\ninst_update_keys\n'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            check=False, timeout=60,
                            env={"PATH": os.environ["PATH"], "LOG": str(log),
                                 "moddir": str(moddir / initramfs.MODULE), **env})
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c]
    return result.returncode, calls


def test_the_module_installs_the_keys_dracut_conf_names(tmp_path: Path,
                                                        keys: dict[str, KeyPair]) -> None:
    code, calls = _module_setup(tmp_path, {
        "dmoverlay_updates_keys": str(keys["alice"].public),
        "dmoverlay_updates_revoked": str(keys["mallory"].public)})
    assert code == 0
    assert calls == [["simple", str(keys["alice"].public), os.fspath(updates.KEYS)],
                     ["simple", str(keys["mallory"].public), os.fspath(updates.REVOKED)],
                     ["bin", "ssh-keygen"]]


def test_the_module_without_keys_carries_ssh_keygen_if_there(tmp_path: Path) -> None:
    assert _module_setup(tmp_path, {}) == (0, [["multiple", "-o", "ssh-keygen"]])


@pytest.mark.parametrize(("env", "words"), [
    ({"dmoverlay_updates_keys": "/nonexistent"}, "dmoverlay_updates_keys=/nonexistent: no such"),
    ({"dmoverlay_updates_revoked": "/etc/hostname"}, "revoked is set without"),
    ({"dmoverlay_updates_keys": "/etc/hostname", "NO_BINARY": "1"}, "ssh-keygen is not"),
])
def test_the_module_stops_dracut_for_keys_it_cannot_carry(tmp_path: Path,
                                                          env: dict[str, str],
                                                          words: str) -> None:
    code, calls = _module_setup(tmp_path, env)
    assert code == 1
    assert calls[-1][0] == "dfatal" and words in " ".join(calls[-1][1:])
