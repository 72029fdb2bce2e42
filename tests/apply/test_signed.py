"""`dmoverlay sign` and `dmoverlay apply --verify KEYS [--revoked FILE]`, on
real updates signed with real keys made here: a good signature is applied;
each bad one is one `error:` line, a non-zero exit, and the root and the
run directory as they were."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.apply.execute import ApplyOptions
from dmoverlay.apply.readers import signed as signed_module
from dmoverlay.apply.readers.download import Limits
from dmoverlay.apply.readers.fetchplan import Retry
from dmoverlay.apply.update import apply_update
from dmoverlay.core import signature
from dmoverlay.core.errors import SignatureError, SourceError
from dmoverlay.core.signature import load_trust
from tests.apply.readers import httpkit
from tests.apply.readers.test_image import make_squashfs
from tests.apply.test_cli import apply_cli, error_line, updates_img
from tests.applykit import make_root, snapshot
from tests.conftest import dmoverlay, small_tmpfs
from tests.signkit import KeyPair, sign_as, two_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    return two_keys(tmp_path_factory)


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, run = make_root(tmp_path / "live")
    return tmp_path, root, run


def sign_cli(path: Path, key: KeyPair) -> Path:
    result = dmoverlay("sign", str(path), "--key", str(key.private))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    return Path(f"{path}.sig")


def test_sign_then_apply_verified(live: tuple[Path, Path, Path],
                                  keys: dict[str, KeyPair]) -> None:
    top, root, run = live
    image = updates_img(top, {"lib/libfoo.so": b"signed\n"})
    assert sign_cli(image, keys["alice"]).read_bytes().startswith(signature.ARMOUR)
    result = apply_cli(image, root, run, "--verify", str(keys["alice"].public))
    assert result.returncode == 0, result.stderr
    assert f"{image}: signature good, by dmoverlay-updates (ED25519 key" in result.stderr
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"signed\n"
    assert not (run / "dmoverlay").exists(), "the private copy is gone with the staging"


def _tampered(image: Path, keys: dict[str, KeyPair]) -> None:
    signature.sign(image, keys["alice"].private)
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 1
    image.write_bytes(bytes(data))


def _other_key(image: Path, keys: dict[str, KeyPair]) -> None:
    signature.sign(image, keys["mallory"].private)


def _unsigned(image: Path, keys: dict[str, KeyPair]) -> None:
    pass


def _other_use(image: Path, keys: dict[str, KeyPair]) -> None:
    sign_as(image, keys["alice"], "git")


def _huge(image: Path, keys: dict[str, KeyPair]) -> None:
    sig = signature.sign(image, keys["alice"].private)
    with sig.open("ab") as out:
        out.write(b"\n" * (1 << 20))


def _symlink(image: Path, keys: dict[str, KeyPair]) -> None:
    sig = signature.sign(image, keys["alice"].private)
    sig.rename(image.parent / "elsewhere")
    sig.symlink_to(image.parent / "elsewhere")


def _fifo(image: Path, keys: dict[str, KeyPair]) -> None:
    os.mkfifo(f"{image}.sig")


def _garbage(image: Path, keys: dict[str, KeyPair]) -> None:
    Path(f"{image}.sig").write_bytes(os.urandom(300))


CASES = {
    "tampered": (_tampered, (), "does not match its signature"),
    "another key": (_other_key, (), "does not hold"),
    "missing .sig": (_unsigned, (), "not signed: no "),
    "wrong namespace": (_other_use, (), "made for another use, not for dmoverlay-updates"),
    "expired key": (None, (), "signed by a key that has expired"),
    "revoked key": (None, ("--revoked", "REVOKED"), "signed by a revoked key"),
    "huge .sig": (_huge, (), "larger than 64 KiB"),
    "symlinked .sig": (_symlink, (), "a signature is a symlink"),
    "fifo .sig": (_fifo, (), "a signature is not a regular file"),
    "garbage .sig": (_garbage, (), "is not an SSH signature"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_signature_applies_nothing(live: tuple[Path, Path, Path],
                                         keys: dict[str, KeyPair], case: str) -> None:
    top, root, run = live
    image = updates_img(top, {"lib/libfoo.so": b"evil\n", "etc/new": b"x\n"})
    make, extra, words = CASES[case]
    trusted = keys["alice"].public
    if make is not None:
        make(image, keys)
    else:  # the signature is good; the trust says no
        signature.sign(image, keys["alice"].private)
        if case == "expired key":
            trusted = top / "allowed_signers"
            trusted.write_text(f'ops valid-before="20240101" {keys["alice"].line()}\n')
    args = [a.replace("REVOKED", str(keys["alice"].public)) for a in extra]
    before = snapshot(root), snapshot(run)
    result = apply_cli(image, root, run, "--verify", str(trusted), *args)
    line = error_line(result)
    assert words in line and str(image) in line, line
    assert result.returncode == 1
    assert (snapshot(root), snapshot(run)) == before


def test_verify_refuses_a_directory(live: tuple[Path, Path, Path],
                                    keys: dict[str, KeyPair]) -> None:
    top, root, run = live
    tree = top / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/new").write_text("x\n")
    before = snapshot(root), snapshot(run)
    line = error_line(apply_cli(tree, root, run, "--verify", str(keys["alice"].public)))
    assert "a directory cannot be signed, so --verify refuses it" in line
    assert (snapshot(root), snapshot(run)) == before


@pytest.mark.parametrize(("args", "words"), [
    (("--revoked", "/etc/hostname"), "--revoked goes with --verify"),
    (("--verify", "/nonexistent/keys"), "cannot read /nonexistent/keys"),
    (("--verify", "/"), "/: a directory, not a file of keys"),
])
def test_keys_that_cannot_be_used_are_refused_first(live: tuple[Path, Path, Path],
                                                    args: tuple[str, ...], words: str) -> None:
    top, root, run = live
    image = updates_img(top, {"etc/new": b"x\n"})
    before = snapshot(root), snapshot(run)
    assert words in error_line(apply_cli(image, root, run, *args))
    assert (snapshot(root), snapshot(run)) == before


def test_what_was_verified_is_what_is_applied(live: tuple[Path, Path, Path],
                                              keys: dict[str, KeyPair],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The update file replaced by another just after its signature was
    checked (someone who can write to it, or a device that answers a second
    read differently): what is applied is what was verified."""
    top, root, run = live
    image = updates_img(top, {"lib/libfoo.so": b"signed\n"})
    signature.sign(image, keys["alice"].private)
    evil = updates_img(top / "evil", {"lib/libfoo.so": b"evil\n"})
    verify = signature.verify

    def then_swapped(*args: object, **kw: object) -> signature.Signer:
        signer = verify(*args, **kw)  # type: ignore[arg-type]
        os.replace(evil, image)
        return signer

    monkeypatch.setattr(signed_module, "verify", then_swapped)  # as signed.py calls it
    apply_update(str(image), ApplyOptions(root=root, run_dir=run),
                 trust=load_trust(keys["alice"].public))
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"signed\n"


def test_no_room_to_copy_it_is_refused_before_copying(
        live: tuple[Path, Path, Path], keys: dict[str, KeyPair],
        monkeypatch: pytest.MonkeyPatch) -> None:
    top, root, run = live
    image = updates_img(top, {"etc/new": b"x\n"})
    signature.sign(image, keys["alice"].private)
    real = os.statvfs

    class Full:
        def __init__(self, path: object) -> None:
            self.f_bavail, self.f_frsize = 0, real(path).f_frsize  # type: ignore[arg-type]

    trust = load_trust(keys["alice"].public)
    before = snapshot(root), snapshot(run)
    monkeypatch.setattr(os, "statvfs", Full)
    with pytest.raises(SourceError) as caught:
        apply_update(str(image), ApplyOptions(root=root, run_dir=run), trust=trust)
    assert "free in" in caught.value.message
    assert (snapshot(root), snapshot(run)) == before


# ---------------------------------------------------------------- downloads


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A local HTTP server over a directory; the paths asked for, in order."""
    served = tmp_path / "www"
    served.mkdir()
    asked: list[str] = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served, asked
    finally:
        httpd.shutdown()


def test_a_signed_download(live: tuple[Path, Path, Path], keys: dict[str, KeyPair],
                           server: tuple[str, Path, list[str]]) -> None:
    top, root, run = live
    base, served, asked = server
    image = updates_img(top, {"etc/os-release": b"ID=downloaded\n"})
    os.replace(image, served / "u.img")
    signature.sign(served / "u.img", keys["alice"].private)
    digest = hashlib.sha256((served / "u.img").read_bytes()).hexdigest()
    result = apply_cli(f"{base}/u.img?v=2", root, run, "--verify",
                       str(keys["alice"].public), "--sha256", digest)
    assert result.returncode == 0, result.stderr
    assert asked == ["/u.img.sig?v=2", "/u.img?v=2"]
    assert (root / "etc/os-release").read_bytes() == b"ID=downloaded\n"
    assert not (run / "dmoverlay").exists()


def test_an_unsigned_download_is_not_even_fetched(
        live: tuple[Path, Path, Path], keys: dict[str, KeyPair],
        server: tuple[str, Path, list[str]]) -> None:
    top, root, run = live
    base, served, asked = server
    os.replace(updates_img(top, {"etc/new": b"x\n"}), served / "u.img")
    before = snapshot(root), snapshot(run)
    line = error_line(apply_cli(f"{base}/u.img", root, run, "--verify",
                                str(keys["alice"].public)))
    assert line == f"error: {base}/u.img: not signed: cannot download {base}/u.img.sig: " \
                   "HTTP 404 File not found"
    assert asked == ["/u.img.sig"]
    assert (snapshot(root), snapshot(run)) == before


@pytest.mark.parametrize("case", ["tampered", "another key"])
def test_a_bad_download_applies_nothing(live: tuple[Path, Path, Path],
                                        keys: dict[str, KeyPair],
                                        server: tuple[str, Path, list[str]],
                                        case: str) -> None:
    top, root, run = live
    base, served, _ = server
    os.replace(updates_img(top, {"etc/new": b"x\n"}), served / "u.img")
    CASES[case][0](served / "u.img", keys)  # type: ignore[misc]
    before = snapshot(root), snapshot(run)
    line = error_line(apply_cli(f"{base}/u.img", root, run, "--verify",
                                str(keys["alice"].public)))
    assert str(CASES[case][2]) in line and f"{base}/u.img" in line
    assert (snapshot(root), snapshot(run)) == before


def test_a_huge_signature_download_is_refused(live: tuple[Path, Path, Path],
                                              keys: dict[str, KeyPair],
                                              server: tuple[str, Path, list[str]]) -> None:
    top, root, run = live
    base, served, asked = server
    os.replace(updates_img(top, {"etc/new": b"x\n"}), served / "u.img")
    _huge(served / "u.img", keys)
    with pytest.raises(SignatureError, match=r"u\.img\.sig: larger than the 64\.0 KiB expected"):
        apply_update(f"{base}/u.img", ApplyOptions(root=root, run_dir=run),
                     trust=load_trust(keys["alice"].public))
    assert asked == ["/u.img.sig"]
    assert not (run / "dmoverlay").exists()


def test_sign_cli_errors_are_one_line(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    result = dmoverlay("sign", str(tmp_path / "none"), "--key", str(keys["alice"].private))
    assert error_line(result) == f"error: cannot sign {tmp_path / 'none'}: not a regular file"



@pytest.mark.root
def test_a_signed_squashfs_image_is_mounted_from_the_verified_copy(
        live: tuple[Path, Path, Path], keys: dict[str, KeyPair]) -> None:
    """An image's blocks are read whenever the kernel wants them: the loop
    device is over the verified copy, gone with the staging."""
    top, root, run = live
    tree = top / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/from-image").write_text("signed\n")
    image = make_squashfs(tree, top / "u.squashfs")
    signature.sign(image, keys["alice"].private)
    result = apply_cli(image, root, run, "--verify", str(keys["alice"].public))
    assert result.returncode == 0, result.stderr
    assert (root / "etc/from-image").read_text() == "signed\n"
    assert not (run / "dmoverlay").exists()
    assert str(top) not in Path("/proc/self/mountinfo").read_text()


def test_mkupdates_signs_what_it_makes(live: tuple[Path, Path, Path],
                                       keys: dict[str, KeyPair]) -> None:
    """tree -> signed updates image -> verified and applied: the lifecycle
    in three commands.  A signature left from an earlier image never stands
    beside a new one: without --force both are kept, with it both replaced."""
    top, root, run = live
    tree = top / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/libfoo.so").write_bytes(b"made and signed\n")
    image = top / "updates.img"
    made = dmoverlay("-q", "mkupdates", str(tree), "-o", str(image), "--all-root",
                     "--sign", str(keys["alice"].private))
    assert made.returncode == 0, made.stderr
    result = apply_cli(image, root, run, "--verify", str(keys["alice"].public))
    assert result.returncode == 0, result.stderr
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"made and signed\n"
    again = dmoverlay("-q", "mkupdates", str(tree), "-o", str(image), "--all-root")
    assert again.returncode == 1 and error_line(again) == f"error: {image} exists"
    (tree / "usr/lib/libfoo.so").write_bytes(b"changed, unsigned\n")
    forced = dmoverlay("-q", "mkupdates", str(tree), "-o", str(image), "--all-root", "--force")
    assert forced.returncode == 0, forced.stderr
    assert not Path(f"{image}.sig").exists()
    no_key = dmoverlay("-q", "mkupdates", str(tree), "-o", str(top / "other.img"),
                       "--sign", str(top / "missing-key"))
    assert no_key.returncode != 0 and "no such key file" in error_line(no_key)
    assert not (top / "other.img").exists()


def test_a_signature_download_stops_at_64_kib(tmp_path: Path, keys: dict[str, KeyPair],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """URL.sig of no stated length, endless as far as the download can
    tell: stopped past 64 KiB, not where the staging filesystem (RAM at
    boot) is full."""
    httpkit.without_proxies(monkeypatch)
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    st = os.statvfs(staging)
    room = Limits(reserve=st.f_bavail * st.f_frsize - 1024 * 1024,
                  retry=Retry(tries=1, first_delay=0.01, max_delay=0.01))
    with httpkit.serving() as (base, httpd):
        httpd.routes = {"/u.img.sig": httpkit.send_unsized(b"x" * (4 * 1024 * 1024))}
        with pytest.raises(SignatureError) as caught, signed_module.verified_download(
                f"{base}/u.img", trust=load_trust(keys["alice"].public), staging=staging,
                limits=room):
            pass
    assert caught.value.message == f"{base}/u.img: not signed: cannot download " \
                                   f"{base}/u.img.sig: larger than the 64.0 KiB expected"
    assert list(staging.iterdir()) == []


def test_every_failure_to_read_keys_or_sign_has_a_hint(live: tuple[Path, Path, Path],
                                                       keys: dict[str, KeyPair]) -> None:
    """One `error:` line, then the `hint:` line that says what to give."""
    top, root, run = live
    image = updates_img(top, {"etc/new": b"x\n"})
    signature.sign(image, keys["alice"].private)
    os.mkfifo(top / "fifo")
    not_a_key = top / "not-a-key"
    not_a_key.write_text("hello\n")
    runs = {
        "keys a fifo": apply_cli(image, root, run, "--verify", str(top / "fifo")),
        "keys missing": apply_cli(image, root, run, "--verify", str(top / "none")),
        "revoked a fifo": apply_cli(image, root, run, "--verify", str(keys["alice"].public),
                                    "--revoked", str(top / "fifo")),
        "sign a missing file": dmoverlay("sign", str(top / "none"), "--key",
                                         str(keys["alice"].private)),
        "sign with no key": dmoverlay("sign", str(image), "--key", str(not_a_key)),
    }
    for what, result in runs.items():
        lines = result.stderr.splitlines()
        at = lines.index(error_line(result))
        assert lines[at + 1:at + 2] and lines[at + 1].startswith("hint: "), (what, result.stderr)


def test_a_copy_that_takes_the_last_room_is_one_error(live: tuple[Path, Path, Path],
                                                      keys: dict[str, KeyPair]) -> None:
    """The private copy may fill the run directory (RAM at boot) to the
    page: the signature and keys staged after it then find no room, which
    is one error line, not a traceback, with nothing left."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    top, root, _ = live
    with small_tmpfs(top / "small-run", "size=256k,mode=0755") as run:
        st = os.statvfs(run)
        image = top / "u.img"
        image.write_bytes(os.urandom(st.f_bavail * st.f_frsize - 100))
        signature.sign(image, keys["alice"].private)
        before = snapshot(root)
        line = error_line(apply_cli(image, root, run, "--verify", str(keys["alice"].public)))
        assert line.startswith(f"error: {image}: cannot stage its signature and keys in ")
        assert line.endswith(": No space left on device")
        assert snapshot(root) == before
        assert list(run.iterdir()) == []


def test_a_malformed_url_to_verify_is_one_line(live: tuple[Path, Path, Path],
                                               keys: dict[str, KeyPair]) -> None:
    """Its .sig URL is made of it first: urllib's ValueError was a traceback."""
    _, root, run = live
    line = error_line(apply_cli("http://[::1/u.img", root, run, "--verify",
                                str(keys["alice"].public)))
    assert line == "error: cannot download http://[::1/u.img: not a valid URL (Invalid IPv6 URL)"
    assert not (run / "dmoverlay").exists()
