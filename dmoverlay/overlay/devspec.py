"""dracut's names for boot media: LABEL=, UUID=, PARTUUID=, PARTLABEL=,
CDLABEL= (an ISO 9660 label), optionally after `live:` as in root=live:..."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmoverlay.core.errors import UsageError
from dmoverlay.core.run import run

KEYS = {"LABEL": "LABEL", "UUID": "UUID", "PARTUUID": "PARTUUID", "PARTLABEL": "PARTLABEL",
        "CDLABEL": "LABEL"}


@dataclass(frozen=True)
class Spec:
    key: str  # as blkid names it
    value: str
    text: str  # as the user wrote it


def looks_like_spec(text: str) -> bool:
    """Is `text` meant as KEY=VALUE (a known key in any case, or any upper
    case word: a misspelt key is refused, not taken for a path)?"""
    key, sep, _ = text.removeprefix("live:").partition("=")
    return bool(sep) and (key.upper() in KEYS or _KEY_WORD.fullmatch(key) is not None)


_KEY_WORD = re.compile(r"[A-Z][A-Z0-9_]*")


def parse(text: str) -> Spec | None:
    """A device spec, or None when `text` is a path."""
    body = text.removeprefix("live:")
    key, sep, value = body.partition("=")
    if not sep or key.upper() not in KEYS:
        if looks_like_spec(text):
            raise UsageError(f"unknown device spec {key}=",
                             hint=f"use one of {', '.join(k + '=' for k in KEYS)}")
        return None
    if not value:
        raise UsageError(f"empty device spec {text!r}",
                         hint=f"name the device: {key.upper()}=VALUE")
    return Spec(KEYS[key.upper()], value.replace("\\x20", " "), text)


@dataclass(frozen=True)
class Location:
    """A device or file as the user named it, parsed once: a spec that blkid
    resolves when setup needs the device, or a path."""

    text: str  # as written: what messages show
    spec: Spec | None  # None: `text` is a path


def location(text: str) -> Location:
    return Location(text, parse(text))


def find(where: Location) -> str:
    """The path: the one device a spec matches, or the path as written."""
    return resolve(where.spec) if where.spec else where.text


def resolve(spec: Spec) -> str:
    """The one block device that matches, by blkid (no cache: it may be stale)."""
    result = run(["blkid", "-c", "/dev/null", "-o", "device", "-t", f"{spec.key}={spec.value}"],
                 check=False)
    devices = sorted(set(result.stdout.split()))
    if not devices:
        raise UsageError(f"no device matches {spec.text}",
                         hint="blkid lists the labels and UUIDs of this machine's devices")
    if len(devices) > 1:
        raise UsageError(f"{spec.text} matches {len(devices)} devices: {', '.join(devices)}",
                         hint="use a UUID= or PARTUUID=, which are unique")
    return devices[0]
