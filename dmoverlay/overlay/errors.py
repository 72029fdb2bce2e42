"""The overlay job's errors: one class for what setup, status or teardown
could not do, and its case of an overlay that does not exist."""

from __future__ import annotations

from dmoverlay.core.errors import DmoverlayError


class OverlayError(DmoverlayError):
    """Setup, status or teardown could not be done."""


class NoOverlay(OverlayError):
    """Nothing is recorded under that name."""
