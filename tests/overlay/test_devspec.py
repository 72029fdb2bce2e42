"""dracut's device specs: LABEL=, UUID=, PARTUUID=, PARTLABEL=, CDLABEL=."""

from __future__ import annotations

import pytest

from dmoverlay.core.errors import UsageError
from dmoverlay.overlay import devspec


@pytest.mark.parametrize(("text", "key", "value"), [
    ("LABEL=Fedora-Live", "LABEL", "Fedora-Live"),
    ("live:CDLABEL=Fedora\\x20WS", "LABEL", "Fedora WS"),
    ("UUID=1234-ABCD", "UUID", "1234-ABCD"),
    ("PARTUUID=0fc63daf-8483", "PARTUUID", "0fc63daf-8483"),
    ("PARTLABEL=LIVE", "PARTLABEL", "LIVE"),
])
def test_device_specs(text: str, key: str, value: str) -> None:
    spec = devspec.parse(text)
    assert spec is not None and (spec.key, spec.value) == (key, value)


def test_paths_are_not_specs() -> None:
    assert devspec.parse("/run/media/squashfs.img") is None
    assert devspec.parse("./dir=with=equals/x.img") is None
    assert devspec.parse("/A=B/x.img") is None  # "/A" is no KEY, upper case or not


@pytest.mark.parametrize("text", ["LABEL=", "SERIAL=123"])
def test_bad_specs(text: str) -> None:
    with pytest.raises(UsageError):
        devspec.parse(text)


def test_spec_matching_nothing() -> None:
    spec = devspec.parse("LABEL=dmoverlay-no-such-label")
    assert spec is not None
    with pytest.raises(UsageError, match="no device matches"):
        devspec.resolve(spec)
