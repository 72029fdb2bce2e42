"""dmoverlay apply UPDATES --root ROOT, and dmoverlay rollback"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dmoverlay.apply.execute import (
    ApplyOptions,
    ApplyRefused,
    Spool,
    apply_members,
    read_all,
    staging,
)
from dmoverlay.apply.execute import rollback as undo_last
from dmoverlay.apply.plan import Op, Plan
from dmoverlay.apply.readers import DOWNLOAD_DEADLINE, open_update
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


def plan_dict(plan: Plan) -> dict[str, object]:
    return {
        "actions": [{"op": str(a.op), "name": a.name, "tree": a.where.tree,
                     "path": a.where.path, "replaces": a.replaces, "detail": a.detail}
                    for a in plan.actions],
        "refusals": [{"name": r.name, "reason": r.reason, "hint": r.hint}
                     for r in plan.refusals],
    }


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
    with staging(opts) as place:
        spool = Spool(place)
        try:
            # applied inside: an image stays mounted, a download kept, while
            # their files are copied from where they lie
            with open_update(updates, staging=place, sha256=sha256,
                             deadline=timeout) as reader:
                with log.step(f"reading {updates}"):
                    members = read_all(reader, spool)
                result = apply_members(opts, members, spool)
        except ApplyRefused as exc:
            if as_json:
                click.echo(json.dumps({"ok": False, **plan_dict(exc.plan)}, indent=2))
            elif dry_run:
                click.echo("\n".join(plan_lines(exc.plan)))
            raise
        finally:
            spool.close()
    if as_json:
        click.echo(json.dumps({"ok": True, "dry_run": dry_run, "transaction": result.txn,
                               "undo_first": result.pending, **plan_dict(result.plan)},
                              indent=2))
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
