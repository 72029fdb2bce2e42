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
from dmoverlay.core.errors import UsageError
from dmoverlay.core.signature import Trust, load_trust
from dmoverlay.overlay.options import STATE_DIR


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
@click.argument("updates", required=False)
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="The new root to update (e.g. /sysroot before switch_root).")
@click.option("--run-dir", default="/run", show_default=True,
              help="Where run/ entries go: the live system's /run ('none': refuse them).")
@click.option("--sha256", help="Checksum the UPDATES file (or download) must have.")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="Another http(s) URL of the same download, tried when one fails "
                   "(repeat for more, in the order given).")
@click.option("--verify", "keys", type=click.Path(path_type=Path), metavar="KEYS",
              help="Refuse the update unless FILE.sig (URL.sig) is its signature by a key "
                   "in KEYS: an allowed_signers file, or public keys one a line.")
@click.option("--revoked", type=click.Path(path_type=Path), metavar="FILE",
              help="With --verify: keys no longer trusted (a KRL, or public keys).")
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
              help="Seconds a download may take in all, retries included (30 s without "
                   "progress fail a try); with --from-cmdline, all the updates together.")
@click.option("--from-cmdline", "cmdline_file", is_flag=False, flag_value="/proc/cmdline",
              metavar="[FILE]",
              help="Apply the updates a kernel command line names (rd.live.updates=, "
                   "inst.updates=: URL, DEVICE:/PATH, or /PATH on the live medium), in turn; "
                   "one that fails is left out and the rest go on (at boot).")
@click.option("--name", default="live", show_default=True,
              help="With --from-cmdline: the overlay whose medium holds /PATH updates.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=STATE_DIR,
              show_default=True, help="Where setup recorded the overlay.")
def command(updates: str | None, root: Path, run_dir: str, sha256: str | None,
            mirrors: tuple[str, ...], keys: Path | None, revoked: Path | None,
            allow_setuid: bool, allow_xattrs: tuple[str, ...], dry_run: bool,
            as_json: bool, jobs: int, timeout: float, cmdline_file: str | None,
            name: str, state_dir: Path) -> None:
    """Apply UPDATES (a directory, cpio or tar archive, filesystem image, or
    http(s) URL) onto ROOT: links kept, nothing written outside ROOT, every
    file replaced atomically, all or nothing.  `dmoverlay rollback` undoes it."""
    opts = _options(root, run_dir, allow_setuid=allow_setuid, allow_xattrs=allow_xattrs,
                    dry_run=dry_run, jobs=jobs)
    trust = _trust(keys, revoked)
    if cmdline_file is not None:
        given = [word for word, there in (("UPDATES", updates is not None),
                                          ("--sha256", sha256 is not None),
                                          ("--mirror", bool(mirrors))) if there]
        if given:
            raise UsageError("--from-cmdline takes the updates from the command line: "
                             f"{given[0]} too",
                             hint="give either --from-cmdline or UPDATES")
        from dmoverlay.boot.hooks import apply_from_cmdline  # as dmoverlay-boot does

        apply_from_cmdline(cmdline_file, opts, name=name, state_dir=state_dir, deadline=timeout,
                           as_json=as_json, say=lambda text, err: click.echo(text, err=err),
                           trust=trust)
        return
    if updates is None:
        raise UsageError("UPDATES is missing", hint="name the update, or give --from-cmdline")
    try:
        result = apply_update(updates, opts, sha256=sha256, mirrors=mirrors, trust=trust,
                              deadline=timeout)
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


def _trust(keys: Path | None, revoked: Path | None) -> Trust | None:
    if keys is None:
        if revoked is not None:
            raise UsageError("--revoked goes with --verify", hint="give --verify KEYS too")
        return None
    return load_trust(keys, revoked)


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
