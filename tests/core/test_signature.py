"""core.signature: signing and verifying with OpenSSH's ssh-keygen, with real
keys made here; every way a signature can fail is one line naming the file
and why."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dmoverlay.core import run, signature
from dmoverlay.core.errors import KeysError, SignatureError, ToolMissing
from dmoverlay.core.signature import (
    NAMESPACE,
    PRINCIPAL,
    Trust,
    allowed_signers,
    load_trust,
    read_signature,
    sign,
    signature_url,
    verify,
)
from tests.signkit import KeyPair, sign_as, two_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    return two_keys(tmp_path_factory)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    where = tmp_path / "work"
    where.mkdir(mode=0o700)
    return where


def signed(tmp_path: Path, key: KeyPair, data: bytes = b"an update\n") -> Path:
    update = tmp_path / "u.img"
    update.write_bytes(data)
    sign(update, key.private)
    return update


def check(update: Path, trust: Trust, work: Path) -> signature.Signer:
    sig = read_signature(Path(f"{update}.sig"), label=f"{update}.sig", update=str(update))
    return verify(update, sig, trust, label=str(update), work=work)


def refused(update: Path, trust: Trust, work: Path) -> str:
    with pytest.raises(SignatureError) as caught:
        check(update, trust, work)
    message = caught.value.message
    assert "\n" not in message and message.startswith(str(update)), message
    assert caught.value.hint
    return message


def test_a_good_signature_by_a_public_key_file(tmp_path: Path, keys: dict[str, KeyPair],
                                               work: Path) -> None:
    update = signed(tmp_path, keys["alice"])
    assert Path(f"{update}.sig").read_bytes().startswith(signature.ARMOUR)
    signer = check(update, load_trust(keys["alice"].public), work)
    assert signer.principal == PRINCIPAL
    assert signer.key.startswith("ED25519 key SHA256:")
    assert os.listdir(work) == [], "the private copies are gone"


def test_a_good_signature_by_an_allowed_signers_file(tmp_path: Path,
                                                     keys: dict[str, KeyPair],
                                                     work: Path) -> None:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"# the release team\nrelease@example.org "
                       f'namespaces="{NAMESPACE}" {keys["alice"].line()}\n')
    update = signed(tmp_path, keys["alice"])
    assert check(update, load_trust(allowed), work).principal == "release@example.org"


def test_several_public_keys_in_one_file(tmp_path: Path, keys: dict[str, KeyPair],
                                         work: Path) -> None:
    both = tmp_path / "keys"
    both.write_text(f"{keys['mallory'].line()}\n\n# ours\n{keys['alice'].line()}\n")
    check(signed(tmp_path, keys["alice"]), load_trust(both), work)


def test_a_changed_file_is_refused(tmp_path: Path, keys: dict[str, KeyPair],
                                   work: Path) -> None:
    update = signed(tmp_path, keys["alice"])
    update.write_bytes(b"an update, changed\n")
    assert "does not match its signature" in refused(
        update, load_trust(keys["alice"].public), work)


def test_a_signature_by_another_key_is_refused(tmp_path: Path, keys: dict[str, KeyPair],
                                               work: Path) -> None:
    update = signed(tmp_path, keys["mallory"])
    message = refused(update, load_trust(keys["alice"].public), work)
    assert f"which {keys['alice'].public} does not hold" in message
    assert "ED25519 key SHA256:" in message


def test_a_signature_for_another_use_is_refused(tmp_path: Path, keys: dict[str, KeyPair],
                                                work: Path) -> None:
    """A git commit signature, say, by the very key trusted."""
    update = tmp_path / "u.img"
    update.write_bytes(b"an update\n")
    sign_as(update, keys["alice"], "git")
    assert "made for another use" in refused(update, load_trust(keys["alice"].public), work)


def test_a_signature_for_another_use_by_an_unknown_key(tmp_path: Path,
                                                       keys: dict[str, KeyPair],
                                                       work: Path) -> None:
    update = tmp_path / "u.img"
    update.write_bytes(b"an update\n")
    sign_as(update, keys["mallory"], "file")
    assert "made for another use" in refused(update, load_trust(keys["alice"].public), work)


@pytest.mark.parametrize(("option", "words"), [
    ('valid-before="20200101"', "has expired (valid before 2020-01-01"),
    ('valid-after="20990101"', "is not valid yet (valid after 2099-01-01"),
])
def test_a_key_out_of_its_validity_is_refused(tmp_path: Path, keys: dict[str, KeyPair],
                                              work: Path, option: str, words: str) -> None:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"# first\nrelease {option} {keys['alice'].line()}\n")
    message = refused(signed(tmp_path, keys["alice"]), load_trust(allowed), work)
    assert words in message and f"{allowed} line 2" in message


def test_a_key_trusted_for_other_uses_only_is_refused(tmp_path: Path,
                                                      keys: dict[str, KeyPair],
                                                      work: Path) -> None:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'git namespaces="git" {keys["alice"].line()}\n')
    assert "trusts for other uses only" in refused(
        signed(tmp_path, keys["alice"]), load_trust(allowed), work)


@pytest.mark.parametrize("form", ["list", "krl"])
def test_a_revoked_key_is_refused(tmp_path: Path, keys: dict[str, KeyPair], work: Path,
                                  form: str) -> None:
    revoked = tmp_path / "revoked"
    if form == "list":
        revoked.write_text(keys["alice"].line() + "\n")
    else:
        subprocess.run(["ssh-keygen", "-k", "-f", str(revoked), str(keys["alice"].public)],
                       check=True, capture_output=True)
    update = signed(tmp_path, keys["alice"])
    message = refused(update, load_trust(keys["alice"].public, revoked), work)
    assert "revoked key" in message and str(revoked) in message


def test_a_revoked_list_of_other_keys_lets_a_good_one_through(
        tmp_path: Path, keys: dict[str, KeyPair], work: Path) -> None:
    revoked = tmp_path / "revoked"
    revoked.write_text(keys["mallory"].line() + "\n")
    check(signed(tmp_path, keys["alice"]), load_trust(keys["alice"].public, revoked), work)


def test_the_revoked_keys_checked_are_those_used(tmp_path: Path, keys: dict[str, KeyPair],
                                                 work: Path) -> None:
    """The revoked file turned to garbage after it was checked: ssh-keygen
    would take that for "every key revoked" and say nothing; it is given
    the content that was checked."""
    revoked = tmp_path / "revoked"
    revoked.write_text(keys["mallory"].line() + "\n")
    trust = load_trust(keys["alice"].public, revoked)
    revoked.write_text("garbage\n")
    check(signed(tmp_path, keys["alice"]), trust, work)


# ---------------------------------------------------------------- the signature file


@pytest.mark.parametrize(("kind", "words"), [
    ("missing", "not signed: no "),
    ("huge", "larger than 64 KiB"),
    ("symlink", "a signature is a symlink"),
    ("dangling", "a signature is a symlink"),
    ("fifo", "a signature is not a regular file"),
    ("directory", "a signature is not a regular file"),
    ("garbage", "is not an SSH signature"),
    ("binary", "is not an SSH signature"),
])
def test_a_hostile_signature_file_is_refused(tmp_path: Path, keys: dict[str, KeyPair],
                                             kind: str, words: str) -> None:
    update = signed(tmp_path, keys["alice"])
    sig = Path(f"{update}.sig")
    good = sig.read_bytes()
    sig.unlink()
    if kind == "huge":
        sig.write_bytes(good + b"A" * signature.SIG_MAX)
    elif kind == "symlink":  # even to the right signature: a link is not taken
        (tmp_path / "elsewhere.sig").write_bytes(good)
        sig.symlink_to(tmp_path / "elsewhere.sig")
    elif kind == "dangling":
        sig.symlink_to(tmp_path / "nowhere")
    elif kind == "fifo":  # opened without blocking, never read
        os.mkfifo(sig)
    elif kind == "directory":
        sig.mkdir()
    elif kind == "garbage":
        sig.write_text("not a signature\n")
    elif kind == "binary":
        sig.write_bytes(good.replace(b"\n", b"\n\xff", 1))
    with pytest.raises(SignatureError) as caught:
        read_signature(sig, label=str(sig), update=str(update))
    assert words in caught.value.message
    assert caught.value.message.startswith(f"{update}: ")
    assert "\n" not in caught.value.message


def test_a_signature_that_cannot_be_parsed_is_refused(tmp_path: Path,
                                                      keys: dict[str, KeyPair],
                                                      work: Path) -> None:
    """Armoured, but its body is not a signature: ssh-keygen's parse error,
    in one line."""
    update = signed(tmp_path, keys["alice"])
    sig = Path(f"{update}.sig")
    lines = sig.read_text().splitlines()
    sig.write_text("\n".join([lines[0], "AAAA" * 10, lines[-1]]) + "\n")
    assert "its signature cannot be read" in refused(
        update, load_trust(keys["alice"].public), work)


def test_signature_url_goes_before_the_query() -> None:
    assert signature_url("http://h/u.img") == "http://h/u.img.sig"
    assert signature_url("https://h/a/u.img?t=1#x") == "https://h/a/u.img.sig?t=1"


# ---------------------------------------------------------------- the keys


def test_public_keys_become_allowed_signers_line_for_line(keys: dict[str, KeyPair]) -> None:
    text = f"# ours\n{keys['alice'].line()}\n\n{keys['mallory'].line()}\n"
    lines = allowed_signers(text, "k").splitlines()
    assert lines[0] == "" and lines[2] == ""
    kind, blob, _ = keys["alice"].line().split()
    assert lines[1] == f'{PRINCIPAL} namespaces="{NAMESPACE}" {kind} {blob}'


def test_an_allowed_signers_file_is_taken_as_it_is(keys: dict[str, KeyPair]) -> None:
    text = f"a@b,c@d {keys['alice'].line()}"
    assert allowed_signers(text, "k") == text + "\n"


@pytest.mark.parametrize(("content", "words"), [
    ("", "no keys in it"),
    ("# nothing\n\n", "no keys in it"),
    (None, "a directory"),
    (b"\xff\xfe", "not a text file of keys"),
    ("MIXED", "line 2: not a public key, in a file of them"),
])
def test_keys_that_cannot_be_used(tmp_path: Path, keys: dict[str, KeyPair],
                                  content: str | bytes | None, words: str) -> None:
    path = tmp_path / "keys"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace(
            "MIXED", f"{keys['alice'].line()}\nrelease {keys['mallory'].line()}\n"))
    with pytest.raises(KeysError) as caught:
        load_trust(path)
    assert words in caught.value.message and str(path) in caught.value.message


def test_keys_through_a_link_are_the_users_own(tmp_path: Path, keys: dict[str, KeyPair],
                                                work: Path) -> None:
    """Unlike a signature that comes with an update, the keys are the
    user's: /etc/dmoverlay/updates.keys may be a link config management
    keeps."""
    (tmp_path / "keys").symlink_to(keys["alice"].public)
    check(signed(tmp_path, keys["alice"]), load_trust(tmp_path / "keys"), work)


def test_missing_keys_and_a_fifo_for_keys(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="No such file"):
        load_trust(tmp_path / "none")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(KeysError, match="not a regular file"):
        load_trust(tmp_path / "fifo")


def test_a_revoked_file_that_is_neither_a_krl_nor_keys(tmp_path: Path,
                                                       keys: dict[str, KeyPair]) -> None:
    """ssh-keygen takes such a file for "every key revoked", silently: it is
    refused when given, not found out at each update."""
    bad = tmp_path / "revoked"
    bad.write_text(f"{keys['mallory'].line()}\nnonsense\n")
    with pytest.raises(KeysError, match="line 2: not a public key"):
        load_trust(keys["alice"].public, bad)
    with pytest.raises(KeysError, match="No such file"):
        load_trust(keys["alice"].public, tmp_path / "none")


# ---------------------------------------------------------------- signing


def test_sign_replaces_the_signature_whole(tmp_path: Path, keys: dict[str, KeyPair],
                                           work: Path) -> None:
    update = signed(tmp_path, keys["mallory"])
    old = Path(f"{update}.sig")
    inode = old.stat().st_ino
    assert sign(update, keys["alice"].private) == old
    assert old.stat().st_ino != inode, "renamed into place, not rewritten"
    assert stat.S_IMODE(old.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.img", "u.img.sig", "work"]
    check(update, load_trust(keys["alice"].public), work)


def test_sign_failures(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    update = tmp_path / "u.img"
    update.write_bytes(b"x")
    with pytest.raises(KeysError, match="no such key file"):
        sign(update, tmp_path / "none")
    with pytest.raises(SignatureError, match="not a regular file"):
        sign(tmp_path, keys["alice"].private)
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("hello\n")
    with pytest.raises(SignatureError, match=f"cannot sign {update} with {not_a_key}: "):
        sign(update, not_a_key)
    assert not Path(f"{update}.sig").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-key", "u.img"]


def test_a_signature_that_cannot_be_written_leaves_nothing(tmp_path: Path,
                                                           keys: dict[str, KeyPair]) -> None:
    update = tmp_path / "u.img"
    update.write_bytes(b"x")
    (tmp_path / "u.img.sig").mkdir()
    (tmp_path / "u.img.sig/keep").write_text("mine\n")
    with pytest.raises(SignatureError, match=f"cannot write {update}.sig: Is a directory"):
        sign(update, keys["alice"].private)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.img", "u.img.sig"]
    assert (tmp_path / "u.img.sig/keep").read_text() == "mine\n"


def test_a_passphrase_key_without_a_terminal_fails_in_one_line(tmp_path: Path) -> None:
    """ssh-keygen asks for a passphrase on the terminal; without one (a
    build job), `dmoverlay sign` fails in one line, leaving nothing."""
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)],
                   check=True, capture_output=True)
    update = tmp_path / "u.img"
    update.write_bytes(b"x")
    result = subprocess.run(["setsid", "-w", sys.executable, "-m", "dmoverlay", "sign",
                             str(update), "--key", str(key)],
                            capture_output=True, text=True, timeout=60, check=False,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "SSH_AUTH_SOCK": ""})
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"error: cannot sign {update} with {key}: "), result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub", "u.img"]


def test_ssh_keygen_missing_names_the_package(tmp_path: Path, keys: dict[str, KeyPair],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    update = tmp_path / "u.img"
    update.write_bytes(b"x")
    monkeypatch.setattr(run, "SYSTEM_PATH", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing) as caught:
        sign(update, keys["alice"].private)
    assert caught.value.message == "ssh-keygen not found"
    assert "openssh-client (Debian)" in str(caught.value.hint)
    assert "openssh-clients (Fedora)" in str(caught.value.hint)


def test_a_key_made_elsewhere_verifies(tmp_path: Path, work: Path) -> None:
    """An RSA key, as many people have: any type ssh-keygen takes works."""
    rsa = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)],
                   check=True, capture_output=True)
    update = signed(tmp_path, KeyPair(rsa, Path(f"{rsa}.pub")))
    assert check(update, load_trust(Path(f"{rsa}.pub")), work).key.startswith("RSA key")
