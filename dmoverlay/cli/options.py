"""Option types shared by the commands."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import parse_size

if TYPE_CHECKING:  # generic from click 8.2 on; Debian 12's 8.1 is not
    _IntParam = click.ParamType[int]
else:
    _IntParam = click.ParamType


class SizeType(_IntParam):
    name = "size"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


SIZE = SizeType()


def epoch_from_env() -> int | None:
    """SOURCE_DATE_EPOCH, the reproducible-builds convention, when set."""
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"SOURCE_DATE_EPOCH={text!r} is not a number") from None
