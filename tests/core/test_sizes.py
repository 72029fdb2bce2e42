"""Sizes as options give them and as messages show them."""

from __future__ import annotations

import pytest

from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import GiB, KiB, MiB, format_size, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("4K", 4 * KiB), ("512m", 512 * MiB), ("2G", 2 * GiB), ("1.5GiB", 3 * GiB // 2),
    ("1 T", 1024 * GiB), ("8MB", 8 * MiB),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "2X", "1e9", "lots"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 3 * MiB // 2, 5 * GiB, 2048 * GiB)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 GiB", "2.0 TiB"]
