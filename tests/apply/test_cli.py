"""`dmoverlay apply` and `rollback` from the command line, on real archives."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.applykit import make_root, snapshot, without_dir_times
from tests.conftest import dmoverlay


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, run = make_root(tmp_path / "live")
    return tmp_path, root, run


def updates_img(top: Path, files: dict[str, bytes]) -> Path:
    """anaconda's recipe: find . | cpio -c -o | gzip -9"""
    tree = top / "updates"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    cpio = subprocess.run("find . | cpio --quiet -c -o", shell=True, cwd=tree,
                          capture_output=True, check=True).stdout
    image = top / "updates.img"
    image.write_bytes(gzip.compress(cpio, 9))
    return image


def apply_cli(image: Path | str, root: Path, run: Path,
              *args: str) -> subprocess.CompletedProcess[str]:
    return dmoverlay("apply", str(image), "--root", str(root), "--run-dir", str(run), *args)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a failed run (progress lines may precede it)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_anaconda_style_updates_image(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    image = updates_img(top, {"lib/libfoo.so": b"fixed\n", "run/install/flag": b"1\n"})
    result = apply_cli(image, root, run)
    assert result.returncode == 0, result.stderr
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"fixed\n"
    assert os.readlink(root / "lib") == "usr/lib"
    assert (run / "install/flag").read_bytes() == b"1\n"
    assert not (run / "dmoverlay").exists(), "staging is cleaned up"


def test_dry_run_prints_the_plan_and_writes_nothing(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    image = updates_img(top, {"lib/libfoo.so": b"fixed\n", "opt/new": b"x"})
    before = snapshot(root), snapshot(run)
    result = apply_cli(image, root, run, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "follow link  /lib -> usr/lib" in result.stdout
    assert "replace      /usr/lib/libfoo.so (was a file)" in result.stdout
    assert "create       /opt/new" in result.stdout
    assert (snapshot(root), snapshot(run)) == before


def test_json_report(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    image = updates_img(top, {"etc/os-release": b"ID=fixed\n"})
    report = json.loads(apply_cli(image, root, run, "--json").stdout)
    assert report["ok"] is True and report["transaction"] == "000001"
    assert {"op": "replace", "path": "etc/os-release"}.items() <= report["actions"][-1].items()


def test_refusal_is_one_error_line_and_nothing_written(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    image = updates_img(top, {"tmp/x": b"x", "usr/fine": b"y"})
    before = snapshot(root), snapshot(run)
    # find . lists the directory tmp as well as tmp/x: both are refused
    assert error_line(apply_cli(image, root, run)) == (
        "error: refused: tmp: writes under /tmp: a tmpfs is mounted on /tmp at start-up "
        "and hides it (and 1 more: see --dry-run)")
    assert (snapshot(root), snapshot(run)) == before


@pytest.mark.parametrize("damage", ["truncated", "bad-crc", "garbage"])
def test_corrupt_update_is_refused(live: tuple[Path, Path, Path], damage: str) -> None:
    top, root, run = live
    image = updates_img(top, {"usr/lib/a": os.urandom(50_000), "usr/lib/b": b"b"})
    raw = bytearray(image.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 20]
    elif damage == "bad-crc":
        raw[-8] ^= 0xFF
    else:
        raw = bytearray(os.urandom(1000))
    image.write_bytes(bytes(raw))
    before = snapshot(root), snapshot(run)
    assert "error: " in error_line(apply_cli(image, root, run))
    assert (snapshot(root), snapshot(run)) == before


def test_missing_root_and_updates(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    for args in (["apply", str(top / "nope.img"), "--root", str(root), "--run-dir", str(run)],
                 ["apply", str(top), "--root", str(top / "noroot"), "--run-dir", str(run)],
                 ["rollback", "--root", str(top / "noroot"), "--run-dir", str(run)]):
        error_line(dmoverlay(*args))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "www"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()


def test_url_with_checksum(live: tuple[Path, Path, Path], server: tuple[str, Path]) -> None:
    top, root, run = live
    base, served = server
    image = updates_img(top, {"etc/os-release": b"ID=downloaded\n"})
    (served / "updates.img").write_bytes(image.read_bytes())
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    bad = apply_cli(f"{base}/updates.img", root, run, "--sha256", "0" * 64)
    assert "SHA-256 is" in error_line(bad)
    assert (root / "etc/os-release").read_text() == "ID=old\n"
    assert "404" in error_line(apply_cli(f"{base}/nothing.img", root, run))
    good = apply_cli(f"{base}/updates.img", root, run, "--sha256", digest)
    assert good.returncode == 0, good.stderr
    assert (root / "etc/os-release").read_text() == "ID=downloaded\n"
    assert not (run / "dmoverlay").exists()


def test_url_with_mirrors(live: tuple[Path, Path, Path], server: tuple[str, Path]) -> None:
    """The first URL is gone, the second serves the file: applied, checked."""
    top, root, run = live
    base, served = server
    image = updates_img(top, {"etc/os-release": b"ID=mirrored\n"})
    (served / "updates.img").write_bytes(image.read_bytes())
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    good = apply_cli(f"{base}/gone.img", root, run, "--sha256", digest,
                     "--mirror", f"{base}/updates.img")
    assert good.returncode == 0, good.stderr
    assert "HTTP 404" in good.stderr  # the first one's failure, as a warning
    assert (root / "etc/os-release").read_text() == "ID=mirrored\n"
    assert not (run / "dmoverlay").exists()
    local = apply_cli(image, root, run, "--mirror", f"{base}/updates.img")
    assert error_line(local) == "error: mirrors are for a download: UPDATES is not an " \
                                "http(s) URL"
    not_url = apply_cli(f"{base}/updates.img", root, run, "--mirror", str(image))
    assert error_line(not_url) == f"error: mirror {image}: not an http(s) URL"


def test_directory_and_plain_tar_local_and_downloaded(live: tuple[Path, Path, Path],
                                                     server: tuple[str, Path]) -> None:
    """Data copied from where it lies (a directory, a plain tar on disk) or
    from the staging file (a download, removed once read) lands the same."""
    top, root, run = live
    base, served = server
    updates_img(top, {"etc/os-release": b"ID=new\n", "lib/libfoo.so": os.urandom(70_000)})
    tree = top / "updates"
    subprocess.run(["tar", "-cf", str(served / "u.tar"), "-C", str(tree), "."], check=True)
    before = snapshot(root)
    for spec in (tree, served / "u.tar", f"{base}/u.tar"):
        result = apply_cli(spec, root, run)
        assert result.returncode == 0, (spec, result.stderr)
        assert (root / "etc/os-release").read_bytes() == b"ID=new\n", spec
        assert (root / "usr/lib/libfoo.so").read_bytes() == \
            (tree / "lib/libfoo.so").read_bytes(), spec
        assert dmoverlay("rollback", "--root", str(root), "--run-dir", str(run)).returncode == 0
        assert snapshot(root) == before
    assert not (run / "dmoverlay").exists()


def test_rollback_command(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    before = snapshot(root)
    image = updates_img(top, {"lib/libfoo.so": b"fixed\n"})
    assert apply_cli(image, root, run).returncode == 0
    result = dmoverlay("rollback", "--root", str(root), "--run-dir", str(run))
    assert result.stdout.strip() == "rolled back transaction 000001"
    assert snapshot(root) == before
    again = dmoverlay("rollback", "--root", str(root), "--run-dir", str(run))
    assert again.stdout.strip() == "nothing to roll back"


def test_jobs_give_the_same_tree(tmp_path: Path) -> None:
    """One process or several (the default on this machine for 600 files)
    make the same tree, and rollback undoes either."""
    files = {f"lib/mod{i % 7}/f{i}.so": bytes([i % 256]) * (100 + i) for i in range(600)}
    image = updates_img(tmp_path, files)
    trees = {}
    for jobs in ("1", "2", "0"):
        root, run = make_root(tmp_path / f"live{jobs}")
        before = snapshot(root)
        assert apply_cli(image, root, run, "--jobs", jobs).returncode == 0
        trees[jobs] = without_dir_times(snapshot(root))  # existing ones: when written
        assert dmoverlay("rollback", "--root", str(root), "--run-dir", str(run)).returncode == 0
        assert snapshot(root) == before
    assert trees["1"] == trees["2"] == trees["0"]
    assert trees["1"]["usr/lib/mod3/f10.so"].data == hashlib.sha256(bytes([10]) * 110).hexdigest()


def test_jobs_must_not_be_negative(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    result = apply_cli(updates_img(top, {"etc/x": b"x"}), root, run, "--jobs", "-1")
    assert result.returncode == 2 and "--jobs" in result.stderr


def _update_tree(top: Path, files: dict[str, bytes]) -> Path:
    tree = top / "tree"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    return tree


def _action(op: str, name: str, path: str, *, tree: str = "root", replaces: str = "",
            detail: str = "") -> dict[str, object]:
    return {"op": op, "name": name, "tree": tree, "path": path, "replaces": replaces,
            "detail": detail}


def test_json_reports_keep_their_keys_and_values(live: tuple[Path, Path, Path]) -> None:
    """--json of a dry run, an apply and a refusal, key by key (their order
    too): scripts read them."""
    top, root, run = live
    tree = _update_tree(top, {"lib/libfoo.so": b"fixed\n", "opt/new": b"x"})
    actions = [_action("follow link", "", "lib", detail="/lib -> usr/lib"),
               _action("replace", "lib/libfoo.so", "usr/lib/libfoo.so", replaces="file"),
               _action("create dir", "opt", "opt"),
               _action("create", "opt/new", "opt/new")]
    dry = apply_cli(tree, root, run, "--json", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert list(json.loads(dry.stdout).items()) == [
        ("ok", True), ("dry_run", True), ("transaction", ""), ("undo_first", []),
        ("actions", actions), ("refusals", [])]
    done = apply_cli(tree, root, run, "--json")
    assert done.returncode == 0, done.stderr
    assert list(json.loads(done.stdout).items()) == [
        ("ok", True), ("dry_run", False), ("transaction", "000001"), ("undo_first", []),
        ("actions", actions), ("refusals", [])]
    bad = _update_tree(top / "bad", {"tmp/x": b"x", "usr/fine": b"y"})
    refused = apply_cli(bad, root, run, "--json")
    assert refused.returncode == 1
    why = "writes under /tmp: a tmpfs is mounted on /tmp at start-up and hides it"
    hint = "put it elsewhere, e.g. under var/tmp or run"
    assert list(json.loads(refused.stdout).items()) == [
        ("ok", False), ("actions", [_action("create", "usr/fine", "usr/fine")]),
        ("refusals", [{"name": "tmp", "reason": why, "hint": hint},
                      {"name": "tmp/x", "reason": why, "hint": hint}])]


# ---------------------------------------------------------------- --from-cmdline, at boot

def from_cmdline(line: str, top: Path, root: Path, run: Path,
                 *args: str) -> subprocess.CompletedProcess[str]:
    """`apply --from-cmdline FILE` with the line in FILE, and a state
    directory of its own (no setup recorded in it)."""
    (top / "cmdline").write_text(line + "\n")
    return dmoverlay("apply", "--from-cmdline", str(top / "cmdline"), "--root", str(root),
                     "--run-dir", str(run), "--state-dir", str(top / "state"), *args)


def test_from_cmdline_without_updates_is_a_note(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    before = snapshot(root)
    result = from_cmdline("root=live:LABEL=X rd.live.image quiet", top, root, run)
    assert result.returncode == 0, result.stderr
    assert "no updates on the command line" in result.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize("extra", [["UPDATES"], ["--sha256", "0" * 64],
                                   ["--mirror", "http://10.0.2.2/u.img"]])
def test_from_cmdline_with_updates_given_too_is_one_error(live: tuple[Path, Path, Path],
                                                          extra: list[str]) -> None:
    top, root, run = live
    result = from_cmdline("inst.updates=/u.img", top, root, run, *extra)
    line = error_line(result)
    assert "--from-cmdline takes the updates from the command line" in line
    assert result.returncode == 1


def test_neither_updates_nor_from_cmdline(live: tuple[Path, Path, Path]) -> None:
    _, root, run = live
    line = error_line(dmoverlay("apply", "--root", str(root), "--run-dir", str(run)))
    assert line == "error: UPDATES is missing"


def test_from_cmdline_an_update_left_out_says_why_and_fails(
        live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    before = snapshot(root)
    result = from_cmdline("root=live:LABEL=X rd.live.updates=/u.tar", top, root, run)
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith("error: 1 of 1 updates left out; ")
    warnings = [x for x in result.stderr.splitlines() if x.startswith("warning: ")]
    assert warnings == ["warning: left out /u.tar: no live medium is mounted to find it on "
                        "(the root is an image file, or the medium was released)"]
    assert result.stderr.index(warnings[0]) < result.stderr.index(line)
    assert snapshot(root) == before


def test_from_cmdline_applies_the_others_and_reports_in_json(
        live: tuple[Path, Path, Path], server: tuple[str, Path]) -> None:
    top, root, run = live
    base, served = server
    image = updates_img(top, {"etc/os-release": b"ID=from-the-line\n"})
    (served / "updates.img").write_bytes(image.read_bytes())
    line = f"rd.live.updates={base}/updates.img inst.updates={base}/missing.img"
    result = from_cmdline(line, top, root, run, "--json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert [(o["update"], o["applied"]) for o in report] == [
        (f"{base}/updates.img", True), (f"{base}/missing.img", False)]
    assert report[0]["written"] >= 1 and report[0]["reason"] == ""
    assert "404" in report[1]["reason"]
    assert (root / "etc/os-release").read_bytes() == b"ID=from-the-line\n"
    assert error_line(result).startswith("error: 1 of 2 updates left out; ")


def test_from_cmdline_with_a_planted_state_dir_is_one_error(
        live: tuple[Path, Path, Path], server: tuple[str, Path]) -> None:
    """A state directory someone else could have written in: nothing is
    taken from it, nor mounted in it; the boot goes on without updates."""
    top, root, run = live
    base, served = server
    (served / "u.img").write_bytes(updates_img(top, {"etc/os-release": b"ID=x\n"}).read_bytes())
    (top / "elsewhere").mkdir(mode=0o700)
    (top / "state").symlink_to(top / "elsewhere")
    before = snapshot(root)
    result = from_cmdline(f"inst.updates={base}/u.img", top, root, run)
    assert "not a private directory of this user: a symlink" in error_line(result)
    assert snapshot(root) == before
    assert os.listdir(top / "elsewhere") == []


def test_from_cmdline_dry_run_says_nothing_was_applied(
        live: tuple[Path, Path, Path], server: tuple[str, Path]) -> None:
    top, root, run = live
    base, served = server
    (served / "u.img").write_bytes(updates_img(top, {"etc/os-release": b"ID=x\n"}).read_bytes())
    before = snapshot(root)
    result = from_cmdline(f"inst.updates={base}/u.img", top, root, run, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would apply {base}/u.img (dry run: nothing written)" in result.stderr
    assert f"applied {base}/u.img" not in result.stderr
    assert snapshot(root) == before
    report = json.loads(from_cmdline(f"inst.updates={base}/u.img", top, root, run,
                                     "--dry-run", "--json").stdout)
    assert [(o["applied"], o["dry_run"]) for o in report] == [(True, True)]
