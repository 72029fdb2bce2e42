"""dmoverlay sign FILE --key KEY"""

from __future__ import annotations

from pathlib import Path

import click

from dmoverlay.core import log
from dmoverlay.core.signature import NAMESPACE, sign


@click.command("sign")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-k", "--key", required=True, type=click.Path(path_type=Path),
              help="An OpenSSH private key (or a public key whose private half "
                   "ssh-agent holds).")
def command(file: Path, key: Path) -> None:
    """Sign the updates FILE with an OpenSSH key: FILE.sig, which `dmoverlay
    apply --verify KEYS` checks.  The signature is made for dmoverlay updates
    only (ssh-keygen -Y sign -n dmoverlay-updates)."""
    written = sign(file, key)
    log.info(f"signed {file} ({NAMESPACE}): {written}")
