"""Real OpenSSH keys and signatures for the signed-update tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    def line(self) -> str:
        """The public key as one line: TYPE BASE64 COMMENT."""
        return self.public.read_text().strip()


def make_key(where: Path, name: str) -> KeyPair:
    """A new ed25519 key without a passphrase, by ssh-keygen."""
    where.mkdir(parents=True, exist_ok=True)
    private = where / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test",
                    "-f", str(private)], check=True, capture_output=True)
    return KeyPair(private, where / f"{name}.pub")


def sign_as(path: Path, key: KeyPair, namespace: str) -> Path:
    """PATH.sig made by ssh-keygen itself, in any namespace."""
    with open(path, "rb") as data:
        sig = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", namespace,
                              "-f", str(key.private)], stdin=data, capture_output=True,
                             check=True).stdout
    out = Path(f"{path}.sig")
    out.write_bytes(sig)
    return out


def two_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """alice (trusted in most tests) and mallory (never): for a module's
    `keys` fixture."""
    where = tmp_path_factory.mktemp("keys")
    return {name: make_key(where, name) for name in ("alice", "mallory")}
