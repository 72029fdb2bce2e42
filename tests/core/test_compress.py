"""Which compression an archive's first bytes name."""

from __future__ import annotations

import pytest

from dmoverlay.core.compress import Compression, detect


@pytest.mark.parametrize(("head", "kind"), [
    (b"\x1f\x8b\x08\x00", Compression.GZIP), (b"\xfd7zXZ\x00\x00", Compression.XZ),
    (b"BZh91AY", Compression.BZIP2), (b"\x28\xb5\x2f\xfd\x00", Compression.ZSTD),
    (b"usr/\x00\x00", Compression.NONE), (b"", Compression.NONE),
])
def test_detect_compression(head: bytes, kind: Compression) -> None:
    assert detect(head) is kind
