"""How fast dmoverlay downloads an update, against `curl -o` of the same file
from the same local server, in one run; and what a resume costs.

A file of --mb MiB (default 200, random bytes: an update is compressed) is
written under --scratch (default /var/tmp) and served on 127.0.0.1 by a
server in its own process that sends files with sendfile(2) and answers
Range and If-Range as servers do.  Each client fetches it --repeat times
(default 3) into the same directory, taking turns and turns at going first:
`dmoverlay.apply.readers.download.download` in this process (what apply
runs), and `curl -sS --fail -o FILE URL` as a process.  Best and median
wall time of each, MiB/s, and the ratio of the throughputs (dmoverlay /
curl; goal >= 0.9 x).

The resume: the server cuts the connection at half the file, once; the
download resumes with a Range request.  Timed against an uninterrupted
download, with the default retry delay (drawn between 0.25 and 0.5 s, there
so that a fleet cut off together does not come back together) and with none
(what the resume itself costs); the file resumed is checked byte for byte.

    .venv/bin/python bench/download_bench.py [--mb 200] [--repeat 3] [--json]

No root needed.  The scratch directory and the server are gone at the end,
even after a failure.  Nothing here asserts a time: it prints figures.
"""

from __future__ import annotations

import argparse
import filecmp
import http.server
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import ClassVar

from common import Column, Table, load_average, load_text, stopwatch

from dmoverlay.apply.readers.download import LIMITS, Limits, download
from dmoverlay.apply.readers.fetchplan import Retry
from dmoverlay.core import log
from dmoverlay.core.run import clean_env

MiB = 1 << 20
GOAL = 0.9  # dmoverlay's throughput at least 0.9 x curl's


def say(message: str) -> None:
    print(f"download_bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- the server


class _Files(http.server.BaseHTTPRequestHandler):
    """GET /NAME: the file, whole or from a Range (If-Range honoured);
    GET /cut-TOKEN/NAME: the same, but the first answer for each TOKEN is
    cut at half the file."""

    protocol_version = "HTTP/1.1"
    top = Path()
    cut: ClassVar[set[str]] = set()

    def do_GET(self) -> None:
        match = re.fullmatch(r"/(?:cut-(?P<token>\w+)/)?(?P<name>[\w.]+)", self.path)
        path = self.top / match["name"] if match else None
        if path is None or not path.is_file():
            self.send_error(404)
            return
        st = path.stat()
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        start = self._start(etag)
        self.send_response(200 if start == 0 else 206)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(st.st_size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{st.st_size - 1}/{st.st_size}")
        self.end_headers()
        count = st.st_size - start
        token = match["token"] if match else None
        if token is not None and token not in self.cut:
            self.cut.add(token)
            count = st.st_size // 2 - start
        with open(path, "rb") as f, suppress(OSError):
            self.connection.sendfile(f, start, count)
        if count < st.st_size - start:
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _start(self, etag: str) -> int:
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged is None or self.headers.get("If-Range", etag) != etag:
            return 0
        return int(ranged[1])

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(top: str, reply: Connection) -> None:
    _Files.top = Path(top)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    reply.send(httpd.server_address[1])
    httpd.serve_forever()


@contextmanager
def serving(top: Path) -> Iterator[str]:
    """The base URL of a server of `top`'s files, in its own process."""
    mine, theirs = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(target=_serve,
                                                         args=(os.fspath(top), theirs),
                                                         daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{mine.recv()}"
    finally:
        server.terminate()
        server.join()


# --------------------------------------------------------------- the clients


def make_file(path: Path, size: int) -> None:
    """Random bytes: one random block repeated."""
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])


def by_dmoverlay(url: str, out: Path, limits: Limits = LIMITS,
                 keep: Path | None = None) -> Callable[[], None]:
    def fetch() -> None:
        with download(url, staging=out, limits=limits) as path:
            if keep is not None:
                os.link(path, keep)
    return fetch


def by_curl(url: str, out: Path) -> Callable[[], None]:
    def fetch() -> None:
        subprocess.run(["curl", "-sS", "--fail", "-o", os.fspath(out / "curl.img"), url],
                       env=clean_env(), stdin=subprocess.DEVNULL, check=True)
        (out / "curl.img").unlink()
    return fetch


def timings(methods: dict[str, Callable[[], None]], repeat: int) -> dict[str, list[float]]:
    """Each method `repeat` times, in turns, after one untimed round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for name in names:
        methods[name]()
    for turn in range(repeat):
        for name in names if turn % 2 == 0 else list(reversed(names)):
            with stopwatch() as lap:
                methods[name]()
            times[name].append(lap.wall)
    return times


def resumes(base: str, out: Path, repeat: int) -> dict[str, list[float]]:
    """Uninterrupted, resumed with the default delay, resumed with none."""
    no_delay = Limits(retry=Retry(first_delay=0.0))
    turns = iter(range(1_000_000))
    methods = {
        "uninterrupted": by_dmoverlay(f"{base}/update.img", out),
        "cut at half, resumed": lambda: by_dmoverlay(f"{base}/cut-{next(turns)}/update.img",
                                                     out)(),
        "cut, resumed, no delay": lambda: by_dmoverlay(f"{base}/cut-{next(turns)}/update.img",
                                                       out, no_delay)(),
    }
    return timings(methods, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="file size in MiB (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="downloads per client (default 3)")
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("download_bench: curl not found")
    log.quiet = True  # the download's lines are not timed output
    size = args.mb * MiB
    load_before = load_average()
    top = Path(tempfile.mkdtemp(prefix="download-bench-", dir=args.scratch))
    try:
        www, out = top / "www", top / "out"
        www.mkdir()
        out.mkdir()
        say(f"writing {args.mb} MiB to {www / 'update.img'}")
        make_file(www / "update.img", size)
        with serving(www) as base:
            url = f"{base}/update.img"
            by_dmoverlay(f"{base}/cut-check/update.img", out, keep=top / "resumed.img")()
            if not filecmp.cmp(top / "resumed.img", www / "update.img", shallow=False):
                raise SystemExit("download_bench: the resumed file differs from the original")
            (top / "resumed.img").unlink()
            times = timings({"dmoverlay download": by_dmoverlay(url, out),
                             "curl -o": by_curl(url, out)}, args.repeat)
            resumed = resumes(base, out, args.repeat)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    load_after = load_average()
    report(args, size, times, resumed, (load_before, load_after))


def report(args: argparse.Namespace, size: int, times: dict[str, list[float]],
           resumed: dict[str, list[float]], load: tuple[float, float]) -> None:
    best = {name: min(laps) for name, laps in (times | resumed).items()}
    median = {name: statistics.median(laps) for name, laps in (times | resumed).items()}
    ratio = best["curl -o"] / best["dmoverlay download"]  # of throughputs
    cost = {name: best[name] - best["uninterrupted"]
            for name in ("cut at half, resumed", "cut, resumed, no delay")}
    if args.json:
        print(json.dumps({"mb": args.mb, "repeat": args.repeat, "seconds": times | resumed,
                          "ratio": ratio, "goal": GOAL, "resume_cost": cost,
                          "load": list(load)}, indent=2))
        return
    table = Table((Column("download", "<24"), Column("best", ">9.3f", " s"),
                   Column("MiB/s", ">9.0f"), Column("median", ">10.3f", " s")))
    print(f"download of a {args.mb} MiB file from 127.0.0.1, {args.repeat} times each")
    print(table.header())
    for name, seconds in best.items():
        print(table.row(name, seconds, size / MiB / seconds, median[name]))
    print(f"dmoverlay / curl throughput: {ratio:.2f} x (goal >= {GOAL} x)")
    for name, seconds in cost.items():
        print(f"resume cost, {name}: {seconds:+.3f} s against the uninterrupted download")
    print(load_text(*load))


if __name__ == "__main__":
    main()
