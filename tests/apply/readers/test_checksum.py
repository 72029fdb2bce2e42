"""--sha256: the file must have it before anything else reads it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.core.errors import SourceError, UsageError
from tests.apply.readers.readkit import (
    make_tar,
    read_spec,
    shape,
)

# ------------------------------------------------------------------ checksums


def test_sha256_of_a_local_file(tree: Path, tmp_path: Path, staging: Path) -> None:
    archive = make_tar(tree, tmp_path / "u.tar")
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    got = read_spec(archive, staging, sha256=f"sha256:{good.upper()}")
    assert shape(got) == shape(read_spec(tree, staging))
    with pytest.raises(SourceError, match=f"SHA-256 is {good}, not {'0' * 64}"), \
            open_update(str(archive), staging=staging, sha256="0" * 64):
        pass
    with pytest.raises(UsageError, match="not a SHA-256 checksum"), \
            open_update(str(archive), staging=staging, sha256="abc"):
        pass
    with pytest.raises(UsageError, match="not a directory"), \
            open_update(str(tree), staging=staging, sha256=good):
        pass
