"""dmoverlay doctor [--json]"""

from __future__ import annotations

import json
import sys

import click

from dmoverlay import doctor

# 1 is an error (the group's `error:` lines) and 2 a usage error (click's),
# so "cannot build here" gets a code of its own.
EXIT_NOT_BUILD_READY = 3


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True,
              help="Print the checks as JSON: a list of {name, category, status, detail, "
                   "hint, needed_for} and a summary.")
def command(as_json: bool) -> None:
    """Show what this machine can do for dmoverlay and what is missing: tools,
    Python modules, libblockdev plugins, kernel features (loop, squashfs, ext4,
    device-mapper...) and privileges, each with a hint naming the fix.  Needs no
    root and changes nothing.

    \b
    Exit status:
      0  everything `build` needs is here (a missing device-mapper does not
         count: images are built without it)
      3  something `build` needs is missing
    """
    report = doctor.diagnose()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(doctor.format_text(report))
    code = exit_code(report)
    if code:
        # SystemExit, not ctx.exit: dmoverlay's main() runs click with
        # standalone_mode=False, where ctx.exit's code is returned and lost.
        sys.exit(code)


def exit_code(report: doctor.Report) -> int:
    return 0 if report.ready(doctor.BUILD) else EXIT_NOT_BUILD_READY
