"""Sizes as users write them ("2G", "512MiB", "1000000") and as we print them."""

from __future__ import annotations

import re

from dmoverlay.core.errors import UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "2G", "1.5GiB", "512m", "4096"; units are binary (K = 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"not a size: {text!r}", hint="write a number with K, M, G or T, e.g. 2G")
    value = float(match["num"]) * _UNITS[match["unit"].lower()]
    return int(value)


def format_size(n: int) -> str:
    """A short human size: 512 B, 4.0 KiB, 1.5 GiB."""
    if abs(n) < KiB:
        return f"{n} B"
    size = n / KiB
    for unit in ("KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
