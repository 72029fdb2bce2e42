"""Detached signatures of updates, made and checked by OpenSSH's
`ssh-keygen -Y sign / verify`: no cryptography of ours, keys people already
have, and a tool every Debian and Fedora machine carries (openssh-client).

Signatures are made in one namespace, NAMESPACE, so that a signature made
for anything else (a git commit, a file signed for another tool) never
verifies as an update's.  The keys trusted are an allowed_signers file
(ssh-keygen(1), ALLOWED SIGNERS: per-key `valid-after`/`valid-before`,
`namespaces=`), or a file of public keys (`cat *.pub`), which is turned into
one; revoked keys are a KRL or a list of public keys.

A signature is hostile input until ssh-keygen has verified it: it is read
from a regular file that is not a link, at most SIG_MAX bytes, armoured as
OpenSSH writes it, and copied into a private directory before ssh-keygen
reads it.  ssh-keygen says why a check failed on stderr, in words that are
not an interface (it says nothing at all for a revoked key), so each reason
is found by what passed and what failed, and its words only refine it."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import run
from dmoverlay.core.errors import DmoverlayError, KeysError, SignatureError
from dmoverlay.core.sizes import KiB, MiB

NAMESPACE = "dmoverlay-updates"
SUFFIX = ".sig"
# An armoured RSA-16384 signature is under 5 KiB: more is no signature.
SIG_MAX = 64 * KiB
KEYS_MAX = 1 * MiB  # thousands of keys
REVOKED_MAX = 64 * MiB  # a KRL of many serials or key ids
# The principal the keys of a plain public key file are trusted as.
PRINCIPAL = "dmoverlay-updates"
ARMOUR = b"-----BEGIN SSH SIGNATURE-----"
KRL_MAGIC = b"SSHKRL\n\0"
# The key types OpenSSH writes at the start of a public key line.
_KEY_TYPE = re.compile(r"(?:ssh-|ecdsa-sha2-|sk-ssh-|sk-ecdsa-sha2-)[A-Za-z0-9@.-]+")
_KEY_BLOB = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_FINGERPRINT = re.compile(r" with (\S+ key \S+)")
_KEYS_HINT = "give an allowed_signers file, or public keys one a line (ssh-ed25519 AAAA...)"
_REVOKED_HINT = "give a KRL (ssh-keygen -k), or public keys one a line"
_SIGN_HINT = f"sign it with: dmoverlay sign FILE --key KEY (ssh-keygen -Y sign -n {NAMESPACE})"


@dataclass(frozen=True)
class Trust:
    """The keys an update may be signed by, read and checked once.

    `allowed_signers`: the text ssh-keygen is given, line for line the
    user's file (a public key file's other lines left blank), so that the
    line numbers ssh-keygen names are the user's."""

    keys: str  # the file as the user named it
    allowed_signers: str
    revoked: Path | None = None
    revoked_keys: bytes = b""  # its content, as read and checked


@dataclass(frozen=True)
class Signer:
    """Who signed an update that verified."""

    principal: str
    key: str  # "ED25519 key SHA256:..."


# ---------------------------------------------------------------- where signatures are


def signature_path(path: str | os.PathLike[str]) -> Path:
    """FILE.sig, beside FILE as it was named (a link's name, not its target)."""
    return Path(os.fspath(path) + SUFFIX)


def signature_url(url: str) -> str:
    """URL.sig: the suffix on the URL's path, before any query."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + SUFFIX, fragment=""))


# ---------------------------------------------------------------- reading input


def _read_limited(path: Path, label: str, limit: int, *, error: type[DmoverlayError],
                  what: str, hint: str, link: bool = True) -> bytes:
    """The bytes of a regular file, at most `limit` of them (opened
    non-blocking: a fifo cannot hang us); not through a link unless `link`
    (the user's own files may be links, a signature that comes with an
    update may not).  `hint`: what the file should be, said with a failure."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not link:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{label}: {what} is a symlink",
                        hint=f"put the {what} itself there, not a link") from None
        raise error(f"cannot read {label}: {exc.strerror}", hint=hint) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{label}: {what} is not a regular file", hint=hint)
        data = _read_up_to(fd, limit + 1)
    except OSError as exc:
        raise error(f"cannot read {label}: {exc.strerror}", hint=hint) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{label}: {what} is larger than {limit // KiB} KiB", hint=hint)
    return data


def _read_up_to(fd: int, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size and (chunk := os.read(fd, size - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_signature(path: Path, *, label: str, update: str) -> bytes:
    """The signature of `update` in `path`, checked as far as it can be
    without its key; SignatureError naming the update and why not."""
    try:
        data = _read_limited(path, label, SIG_MAX, error=SignatureError, what="a signature",
                             hint=_SIGN_HINT, link=False)
    except SignatureError as exc:
        if not os.path.lexists(path):
            raise SignatureError(f"{update}: not signed: no {label}",
                                 hint=_SIGN_HINT + ", and ship FILE.sig beside it") from None
        raise SignatureError(f"{update}: {exc.message}", hint=exc.hint) from None
    if not data.lstrip().startswith(ARMOUR) or not data.isascii():
        raise SignatureError(f"{update}: {label} is not an SSH signature",
                             hint=_SIGN_HINT)
    return data


def load_trust(keys: Path, revoked: Path | None = None) -> Trust:
    """The keys in `keys` (an allowed_signers file, or public keys one a
    line), with `revoked` (a KRL or public keys); KeysError naming the file
    and line that cannot be used."""
    label = os.fspath(keys)
    if os.path.isdir(keys):
        raise KeysError(f"{label}: a directory, not a file of keys",
                        hint="give an allowed_signers file or a public key file "
                             "(several keys: cat DIR/*.pub > FILE)")
    raw = _read_limited(keys, label, KEYS_MAX, error=KeysError, what="the keys file",
                        hint=_KEYS_HINT)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise KeysError(f"{label}: not a text file of keys") from None
    revoked_keys = _checked_revoked(revoked) if revoked is not None else b""
    return Trust(label, allowed_signers(text, label), revoked, revoked_keys)


def allowed_signers(text: str, label: str) -> str:
    """`text` as ssh-keygen's allowed_signers: as it is, or, when every
    line is a public key, each key trusted as PRINCIPAL for NAMESPACE only."""
    lines = text.splitlines()
    keys = [n for n, line in enumerate(lines) if _is_entry(line)]
    if not keys:
        raise KeysError(f"{label}: no keys in it",
                        hint="one public key a line (ssh-ed25519 AAAA...), or an "
                             "allowed_signers file (ssh-keygen(1))")
    public = [n for n in keys if _public_key(lines[n]) is not None]
    if not public:
        return text if text.endswith("\n") else text + "\n"
    if len(public) != len(keys):
        bad = next(n for n in keys if n not in public)
        raise KeysError(f"{label} line {bad + 1}: not a public key, in a file of them",
                        hint="a file is either public keys, one a line, or an "
                             "allowed_signers file (PRINCIPALS [OPTIONS] KEY)")
    out = [""] * len(lines)
    for n in public:
        kind, blob = _public_key(lines[n]) or ("", "")
        out[n] = f'{PRINCIPAL} namespaces="{NAMESPACE}" {kind} {blob}'
    return "\n".join(out) + "\n"


def _is_entry(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _public_key(line: str) -> tuple[str, str] | None:
    """(type, base64) of a line `TYPE BASE64 [COMMENT]`, else None."""
    fields = line.split()
    if len(fields) >= 2 and _KEY_TYPE.fullmatch(fields[0]) and _KEY_BLOB.fullmatch(fields[1]):
        return fields[0], fields[1]
    return None


def _checked_revoked(path: Path) -> bytes:
    """The content of `path`: a KRL, or public keys one a line (what else
    ssh-keygen would take as "revokes every key", without a word)."""
    label = os.fspath(path)
    data = _read_limited(path, label, REVOKED_MAX, error=KeysError, what="the revoked keys file",
                         hint=_REVOKED_HINT)
    if data.startswith(KRL_MAGIC):
        return data
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise KeysError(f"{label}: neither a KRL nor a text file of keys") from None
    for n, line in enumerate(lines, 1):
        if _is_entry(line) and _public_key(line) is None:
            raise KeysError(f"{label} line {n}: not a public key",
                            hint="revoked keys: a KRL (ssh-keygen -k) or public keys, "
                                 "one a line")
    return data


# ---------------------------------------------------------------- ssh-keygen


def _keygen(args: Sequence[str | os.PathLike[str]], *, stdin: Path | None = None,
            env: dict[str, str] | None = None) -> run.Result:
    if stdin is None:
        return run.run(["ssh-keygen", *args], check=False, env=env)
    with open(stdin, "rb") as data:
        return run.run(["ssh-keygen", *args], check=False, env=env, stdin_fd=data.fileno())


def sign(path: Path, key: Path) -> Path:
    """Sign the file `path` with the private key `key` (or a public key
    whose private half ssh-agent holds) in NAMESPACE; the signature is
    written whole to FILE.sig, whose path is returned."""
    label = os.fspath(path)
    if not os.path.isfile(path):
        raise SignatureError(f"cannot sign {label}: not a regular file",
                             hint="sign the update file itself (an archive or an image)")
    if not os.path.isfile(key):
        raise KeysError(f"{key}: no such key file",
                        hint="make one with: ssh-keygen -t ed25519 -f KEY")
    agent = {k: os.environ[k] for k in ("SSH_AUTH_SOCK",) if k in os.environ}
    result = _keygen(["-Y", "sign", "-n", NAMESPACE, "-f", key], stdin=path, env=agent)
    out = result.stdout.encode()
    if result.returncode != 0 or not out.startswith(ARMOUR):
        raise SignatureError(f"cannot sign {label} with {key}: {_said(result)}",
                             hint="give an OpenSSH private key (ssh-keygen -t ed25519 -f KEY), "
                                  "or a public key whose private half ssh-agent holds")
    target = signature_path(path)
    try:
        _write_whole(target, out)
    except OSError as exc:
        raise SignatureError(f"cannot write {target}: {exc.strerror}",
                             hint="sign a file in a directory you can write to") from None
    return target


def _write_whole(target: Path, data: bytes) -> None:
    """`data` at `target`, renamed into place: a reader sees the old file or
    the new, never half of one."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), 0o644)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def verify(message: Path, signature: bytes, trust: Trust, *, label: str,
           work: Path) -> Signer:
    """Check that `signature` (read_signature's) is a NAMESPACE signature of
    the bytes of `message`, by a key `trust` holds, valid now and not
    revoked; SignatureError naming `label` and why not.

    `message` must be a file nobody else can change until it has been read
    for good (a copy in a private directory).  `work`: a private directory
    for the signature and keys ssh-keygen is given: the bytes that were
    checked, not the files again."""
    with tempfile.TemporaryDirectory(prefix="verify-", dir=work) as tmp:
        sig, allowed = Path(tmp, "update.sig"), Path(tmp, "allowed_signers")
        revoked = Path(tmp, "revoked") if trust.revoked is not None else None
        try:
            sig.write_bytes(signature)
            allowed.write_text(trust.allowed_signers)
            if revoked is not None:
                revoked.write_bytes(trust.revoked_keys)
        except OSError as exc:  # a copy of the update may have taken the room
            raise SignatureError(f"{label}: cannot stage its signature and keys in {work} to "
                                 f"check it: {exc.strerror}",
                                 hint="free space under the run directory (RAM at boot); "
                                      "nothing was applied") from None
        check = _Check(message, sig, allowed, revoked, trust, label)
        principal = check.principal()
        return check.verified(principal)


@dataclass(frozen=True)
class _Check:
    message: Path
    sig: Path
    allowed: Path
    revoked: Path | None  # the copy of trust.revoked's content
    trust: Trust
    label: str

    def principal(self) -> str:
        """The first principal the signing key is trusted as."""
        found = _keygen(["-Y", "find-principals", "-f", self.allowed, "-s", self.sig])
        names = found.stdout.split("\n")[0].strip()
        if found.returncode == 0 and names:
            return names
        raise self.untrusted(found)

    def verified(self, principal: str) -> Signer:
        revoked: list[str | os.PathLike[str]] = []
        if self.revoked is not None:
            revoked = ["-r", self.revoked]
        done = self._verify(principal, revoked)
        if done.returncode == 0 and done.stdout.startswith("Good"):
            return Signer(principal, _key_of(done.stdout))
        raise self.refused(principal, done)

    def _verify(self, principal: str, revoked: Sequence[str | os.PathLike[str]]) -> run.Result:
        return _keygen(["-Y", "verify", "-f", self.allowed, "-I", principal, "-n", NAMESPACE,
                        "-s", self.sig, *revoked], stdin=self.message)

    def untrusted(self, found: run.Result) -> SignatureError:
        """Why find-principals found no principal for the signing key."""
        if "parse signature" in found.stderr or "sshsig" in found.stderr:
            return SignatureError(f"{self.label}: its signature cannot be read ({_said(found)})",
                                  hint=_SIGN_HINT)
        dated = self._dated(found.stderr)
        if dated is not None:
            return dated
        plain = _keygen(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", self.sig],
                        stdin=self.message)
        if "namespace" in plain.stderr:
            return self._other_use()
        key = _key_of(plain.stdout) if plain.returncode == 0 else "a key"
        bad = self._bad_lines(found.stderr)
        return SignatureError(f"{self.label}: signed by {key}, which {self.trust.keys} "
                              "does not hold",
                              hint=bad or f"trust it by adding its public key to "
                                          f"{self.trust.keys}, or sign with one it holds")

    def refused(self, principal: str, done: run.Result) -> SignatureError:
        """Why verify failed for a key that find-principals knows."""
        if "namespace does not match" in done.stderr:
            return self._other_use()
        if "incorrect signature" in done.stderr:
            return SignatureError(f"{self.label}: does not match its signature: changed or "
                                  "damaged since it was signed",
                                  hint="fetch or copy it again; nothing was applied")
        dated = self._dated(done.stderr)
        if dated is not None:
            return dated
        restricted = self._lines(done.stderr, "not permitted")
        if restricted:
            return SignatureError(f"{self.label}: signed by a key that {self.trust.keys} "
                                  f"line {restricted[0][0]} trusts for other uses only",
                                  hint=f'add {NAMESPACE} to that line\'s namespaces="..."')
        if self.revoked is not None:
            plain = self._verify(principal, [])
            if plain.returncode == 0:
                return SignatureError(f"{self.label}: signed by a revoked key "
                                      f"({_key_of(plain.stdout)}, in {self.trust.revoked})",
                                      hint="sign it again with a key not revoked")
        return SignatureError(f"{self.label}: signature not verified ({_said(done)})")

    def _other_use(self) -> SignatureError:
        return SignatureError(f"{self.label}: its signature was made for another use, not "
                              f"for {NAMESPACE}", hint=_SIGN_HINT)

    def _dated(self, stderr: str) -> SignatureError | None:
        """An expired or not yet valid key, as ssh-keygen reports it."""
        for number, said in self._lines(stderr, "key has expired", "not yet valid"):
            when = re.search(r"valid-(?:before|after) (\S+)", said)
            at = f" ({when[0].replace('-', ' ', 1)})" if when else ""
            what = "has expired" if "expired" in said else "is not valid yet"
            return SignatureError(f"{self.label}: signed by a key that {what}{at}, as "
                                  f"{self.trust.keys} line {number} says",
                                  hint="sign it again with a key valid now, or change "
                                       "the key's valid-after/valid-before")
        return None

    def _bad_lines(self, stderr: str) -> str:
        """The first line of the keys file ssh-keygen could not read, said."""
        for number, said in self._lines(stderr):
            return f"{self.trust.keys} line {number}: {said}"
        return ""

    def _lines(self, stderr: str, *words: str) -> list[tuple[int, str]]:
        """(line, what) of ssh-keygen's complaints about the keys file
        (`ALLOWED:LINE: what`) holding any of `words` (any, with none)."""
        prefix = f"{self.allowed}:"
        found = []
        for line in stderr.splitlines():
            number, sep, said = line.removeprefix(prefix).partition(":")
            if line.startswith(prefix) and sep and number.isdigit() and (
                    not words or any(w in said for w in words)):
                found.append((int(number), said.strip()))
        return found


def _key_of(stdout: str) -> str:
    """"ED25519 key SHA256:..." from ssh-keygen's "Good ... signature"."""
    match = _FINGERPRINT.search(stdout)
    return match[1] if match else "a key"


def _said(result: run.Result) -> str:
    """ssh-keygen's last words, on one line."""
    lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Signing data")]
    return lines[-1] if lines else f"exit {result.returncode}"
