"""dmoverlay apply UPDATES --root ROOT, and dmoverlay rollback"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dmoverlay.apply.plan import Op, Plan
from dmoverlay.apply.update import (
    DOWNLOAD_DEADLINE,
    ApplyOptions,
    ApplyRefused,
    apply_update,
)
from dmoverlay.apply.update import rollback as undo_last
from dmoverlay.core import log


def plan_lines(plan: Plan) -> list[str]:
    lines = []
    for a in plan.actions:
        if a.op is Op.FOLLOW:
            lines.append(f"{a.op:<12} {a.detail}")
        else:
            extra = f" (was a {a.replaces})" if a.op is Op.REPLACE else ""
            lines.append(f"{a.op:<12} {a.where}{extra}   <- {a.name}")
    lines += [f"{'refuse':<12} {r.name}: {r.reason}" for r in plan.refusals]
    return lines


def _options(root: Path, run_dir: str, *, allow_setuid: bool = False,
             allow_xattrs: tuple[str, ...] = (), dry_run: bool = False,
             jobs: int = 0) -> ApplyOptions:
    return ApplyOptions(root=root, run_dir=None if run_dir == "none" else Path(run_dir),
                        allow_setuid=allow_setuid, allow_xattrs=allow_xattrs,
                        dry_run=dry_run, jobs=jobs)


@click.command("apply")
@click.argument("updates")
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="The new root to update (e.g. /sysroot before switch_root).")
@click.option("--run-dir", default="/run", show_default=True,
              help="Where run/ entries go: the live system's /run ('none': refuse them).")
@click.option("--sha256", help="Checksum the UPDATES file (or download) must have.")
@click.option("--allow-setuid", is_flag=True,
              help="Accept setuid/setgid files and file capabilities.")
@click.option("--allow-xattr", "allow_xattrs", multiple=True, metavar="NAME",
              help="Accept xattrs NAME and NAME.* the policy refuses (e.g. security.ima).")
@click.option("-n", "--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="A machine-readable report on stdout.")
@click.option("-j", "--jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes that write files (0: one per CPU for a large update).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              default=DOWNLOAD_DEADLINE, show_default=True,
              help="Seconds a download may take in all (30 s without progress fail it "
                   "sooner).")
def command(updates: str, root: Path, run_dir: str, sha256: str | None, allow_setuid: bool,
            allow_xattrs: tuple[str, ...], dry_run: bool, as_json: bool, jobs: int,
            timeout: float) -> None:
    """Apply UPDATES (a directory, cpio or tar archive, filesystem image, or
    http(s) URL) onto ROOT: links kept, nothing written outside ROOT, every
    file replaced atomically, all or nothing.  `dmoverlay rollback` undoes it."""
    opts = _options(root, run_dir, allow_setuid=allow_setuid, allow_xattrs=allow_xattrs,
                    dry_run=dry_run, jobs=jobs)
    try:
        result = apply_update(updates, opts, sha256=sha256, deadline=timeout)
    except ApplyRefused as exc:
        if as_json:
            click.echo(json.dumps(exc.to_dict(), indent=2))
        elif dry_run:
            click.echo("\n".join(plan_lines(exc.plan)))
        raise
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif dry_run:
        click.echo("\n".join([*(f"{'undo':<12} unfinished transaction {txn} (first)"
                                for txn in reversed(result.pending)),
                               *plan_lines(result.plan)]))
    else:
        log.info(f"applied {result.written} entries (transaction {result.txn}; "
                 "undo with: dmoverlay rollback)")


@click.command("rollback")
@click.option("--root", required=True, type=click.Path(path_type=Path))
@click.option("--run-dir", default="/run", show_default=True)
@click.option("--force", is_flag=True,
              help="Undo it even if entries changed since; those are left as they are.")
def rollback_command(root: Path, run_dir: str, force: bool) -> None:
    """Undo the last apply on ROOT (or finish undoing one a crash cut short).
    Refused if entries it wrote were changed since, unless --force."""
    txn = undo_last(_options(root, run_dir), force=force)
    click.echo(f"rolled back transaction {txn}" if txn else "nothing to roll back")
