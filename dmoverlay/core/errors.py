"""One error hierarchy: every expected failure carries a message and a hint."""

from __future__ import annotations


class DmoverlayError(Exception):
    """An expected failure: the CLI prints it as one `error:` line and a `hint:`."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ToolMissing(DmoverlayError):
    """A command the job needs is not installed."""


class CommandFailed(DmoverlayError):
    """An external command exited non-zero."""

    def __init__(self, message: str, *, hint: str | None = None, stderr: str = "") -> None:
        super().__init__(message, hint=hint)
        self.stderr = stderr


class SourceError(DmoverlayError):
    """The tree or archive to build from is missing, unreadable or malformed."""


class ImageError(DmoverlayError):
    """An image is not what it claims to be, or cannot be written."""


class UsageError(DmoverlayError):
    """Options that contradict each other or cannot be honoured."""
