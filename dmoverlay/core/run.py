"""Every external command goes through here: argv lists, a clean C-locale
environment, stdin closed, and failures turned into one-line errors."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dmoverlay.core.errors import CommandFailed, ToolMissing, install_hint

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

debug = bool(os.environ.get("DMOVERLAY_DEBUG"))


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: C locale, a system PATH, nothing inherited that
    could change a tool's output (TZ, SOURCE_DATE_EPOCH, MKE2FS_CONFIG...)."""
    env = {"PATH": os.environ.get("PATH", "") + ":" + SYSTEM_PATH, "LC_ALL": "C", "TZ": "UTC"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    if extra:
        env.update(extra)
    return env


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=clean_env()["PATH"])


def require_tools(*names: str) -> None:
    """Check every tool a job needs before it starts, naming all that are missing."""
    missing = [n for n in names if find_tool(n) is None]
    if missing:
        raise ToolMissing(f"{', '.join(missing)} not found", hint=install_hint(missing))


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _argv(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    return [os.fspath(a) for a in argv]


def _describe(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    stdin_text: str | None = None,
    stdin_fd: int | None = None,
) -> Result:
    """Run a command, capture its output, raise CommandFailed when it fails.
    Its stdin is `stdin_text`, or the open file `stdin_fd` (read from where
    its offset is), or nothing."""
    args = _argv(argv)
    if debug:
        print(f"+ {_describe(args)}", file=sys.stderr)
    try:
        proc = subprocess.run(
            args,
            env=clean_env(env),
            cwd=cwd,
            input=stdin_text,
            stdin=(None if stdin_text is not None
                   else stdin_fd if stdin_fd is not None else subprocess.DEVNULL),
            capture_output=True,
            text=True,
            errors="surrogateescape",
            check=False,
        )
    except FileNotFoundError:
        raise ToolMissing(f"{args[0]} not found", hint=install_hint([args[0]])) from None
    result = Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise command_failed(result)
    return result


def command_failed(result: Result) -> CommandFailed:
    detail = _last_lines(result.stderr or result.stdout) or "no output"
    return CommandFailed(
        f"{os.path.basename(result.argv[0])} failed (exit {result.returncode}): {detail}",
        hint=f"the command was: {_describe(result.argv)}",
        stderr=result.stderr,
    )


_PERCENT = re.compile(rb"(\d+)%")


class _Streamed:
    """A started command whose stdout we read as it comes; stderr goes to a
    file, so a chatty tool cannot block on a full pipe meanwhile."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]],
                 env: Mapping[str, str] | None,
                 cwd: str | os.PathLike[str] | None = None) -> None:
        self.args = _argv(argv)
        if debug:
            print(f"+ {_describe(self.args)}", file=sys.stderr)
        import tempfile  # streamed commands only (build's): not setup's start-up

        self.errfile = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finish)
        try:
            self.proc = subprocess.Popen(self.args, env=clean_env(env),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self.errfile, cwd=cwd)
        except FileNotFoundError:
            self.errfile.close()
            raise ToolMissing(f"{self.args[0]} not found",
                              hint=install_hint([self.args[0]])) from None
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout

    def finish(self, out: bytes) -> Result:
        """Close our end, wait, and describe what happened."""
        self.stdout.close()
        code = self.proc.wait()
        with self.errfile:
            self.errfile.seek(0)
            err = self.errfile.read()
        return Result(tuple(self.args), code, out.decode(errors="surrogateescape"),
                      err.decode(errors="surrogateescape"))


def run_exact(argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None) -> Result:
    """As run(check=False), with the output as its bytes were (decoded with
    surrogateescape, no newline translation): for a tool that prints names,
    which may hold a CR."""
    cmd = _Streamed(argv, env, cwd=cwd)
    return cmd.finish(cmd.stdout.read())


def run_with_percent(
    argv: Sequence[str | os.PathLike[str]],
    *,
    on_percent: Callable[[int], None],
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run a command that draws its own progress bar on stdout (mksquashfs)
    and report the percentages it prints as they come."""
    cmd = _Streamed(argv, env)
    out = bytearray()
    last = -1
    while chunk := os.read(cmd.stdout.fileno(), 65536):
        out += chunk
        found = _PERCENT.findall(chunk)
        if found and int(found[-1]) != last:
            last = int(found[-1])
            on_percent(last)
    result = cmd.finish(bytes(out))
    if result.returncode != 0:
        raise command_failed(result)
    return result


def run_head(argv: Sequence[str | os.PathLike[str]], limit: int) -> bytes:
    """The first `limit` bytes a command writes to stdout, then it is stopped
    (it dies of SIGPIPE at its next write): for reading a superblock out of a
    multi-gigabyte stream.  Fails only if the command failed before `limit`."""
    cmd = _Streamed(argv, None)
    data = cmd.stdout.read(limit)
    result = cmd.finish(b"")
    if len(data) < limit and result.returncode != 0:
        raise command_failed(result)
    return data
