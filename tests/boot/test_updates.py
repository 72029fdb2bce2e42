"""The command line's updates applied at boot (dmoverlay.boot.updates): where
each is (URL, DEVICE:/PATH, /PATH on the medium), each all or nothing, one
that fails left out with its reason and the next tried; on real tar files,
a real tmpfs as the medium, real loop devices holding real ext4 images."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.apply.update import ApplyOptions, Result, apply_update
from dmoverlay.boot import updates
from dmoverlay.boot.updates import Outcome, Where, parse_source
from dmoverlay.core.errors import BlockDevError, OverlayError, SourceError, UsageError
from dmoverlay.overlay import blockdev
from dmoverlay.overlay.state import Step, StepKind
from tests.apply.readers.httpkit import Served, Server, free_port, serving, without_proxies
from tests.applykit import make_root, snapshot
from tests.conftest import small_tmpfs
from tests.overlay.statefiles import make_state, plant

needs_loop = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/loop-control").exists(),
                                reason="loop devices need root and /dev/loop-control")


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_400_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def truncated_tar(path: Path) -> Path:
    """A tar whose first member is whole and whose second is cut short."""
    make_tar(path, {"usr/lib/first.so": b"whole\n", "usr/lib/second.so": b"x" * 20_000})
    data = path.read_bytes()
    cut = data.index(b"x" * 512) + 4096  # inside the second member's data
    path.write_bytes(data[:cut])
    return path


def _mounts_under(top: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [fields[1] for fields in (line.split() for line in lines)
            if fields[1].startswith(f"{top}/")]


@pytest.fixture
def live(tmp_path: Path) -> tuple[ApplyOptions, Path]:
    """Options that apply onto a usrmerge root (lib -> usr/lib), and a
    private directory to mount devices in."""
    root, run = make_root(tmp_path / "live")
    mounts = tmp_path / "state"
    mounts.mkdir(mode=0o700)
    return ApplyOptions(root=root, run_dir=run), mounts


@pytest.fixture
def medium(tmp_path: Path) -> Iterator[Path]:
    """A real mount, as setup leaves the live medium mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with small_tmpfs(tmp_path / "medium", "size=8m,mode=0755") as where:
        yield where


# ---------------------------------------------------------------- where an update is

@pytest.mark.parametrize(("text", "where", "path", "device"), [
    ("http://10.0.2.2/updates.img", Where.URL, "http://10.0.2.2/updates.img", None),
    ("https://example.org/a/u.tar.gz", Where.URL, "https://example.org/a/u.tar.gz", None),
    ("HTTPS://example.org/u.img", Where.URL, "HTTPS://example.org/u.img", None),
    ("LABEL=UPDATES:/upd2.tar", Where.DEVICE, "/upd2.tar", "LABEL=UPDATES"),
    ("UUID=2024-05-01-10-00-00-00:/a/b.img", Where.DEVICE, "/a/b.img",
     "UUID=2024-05-01-10-00-00-00"),
    ("CDLABEL=Fedora-Live:/updates.img", Where.DEVICE, "/updates.img", "CDLABEL=Fedora-Live"),
    ("PARTLABEL=upd:/u", Where.DEVICE, "/u", "PARTLABEL=upd"),
    ("/dev/vdb1:/x", Where.DEVICE, "/x", "/dev/vdb1"),
    ("/updates.img", Where.MEDIUM, "/updates.img", None),
    ("/LiveOS/updates/", Where.MEDIUM, "/LiveOS/updates/", None),
])
def test_where_an_update_is(text: str, where: Where, path: str, device: str | None) -> None:
    source = parse_source(text)
    assert (source.where, source.path, source.text) == (where, path, text)
    assert (source.device.text if source.device else None) == device
    if device is not None and not device.startswith("/"):
        assert source.device is not None and source.device.spec is not None


@pytest.mark.parametrize(("text", "words"), [
    ("ftp://server/updates.img", "ftp URLs are not supported"),
    ("nfs://server/export/updates.img", "nfs URLs are not supported"),
    ("updates.img", "not an http(s) URL, DEVICE:/PATH or /PATH"),
    ("LiveOS/updates.img", "not an http(s) URL"),
    ("junk:/x", "not an http(s) URL"),
    ("", "not an http(s) URL"),
    ("LABLE=UPD:/u.img", "unknown device spec LABLE="),
    ("LABEL=:/u.img", "empty device spec"),
    ("http://user:pass@10.0.2.2/u.img", "a user or password in a URL is not supported"),
    ("https://user@10.0.2.2/u.img", "a user or password in a URL is not supported"),
])
def test_what_names_no_place_is_refused_with_one_reason(text: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_source(text)
    assert words in caught.value.message
    assert "\n" not in caught.value.message


HEX = "ab" * 32


@pytest.mark.parametrize(("text", "path", "mirrors", "sha256"), [
    ("http://a/u.img,https://b/x/u.img", "http://a/u.img", ("https://b/x/u.img",), None),
    (f"http://a/u.img,http://b/u.img,HTTP://c/u.img#sha256={HEX.upper()}", "http://a/u.img",
     ("http://b/u.img", "HTTP://c/u.img"), HEX),
    (f"http://a/u.img#sha256={HEX}", "http://a/u.img", (), HEX),  # dracut reads it too
    ("http://a/u,v.img", "http://a/u,v.img", (), None),  # a comma inside a URL stays
    ("http://a/u.img?x=1,2", "http://a/u.img?x=1,2", (), None),
])
def test_mirrors_and_checksums_of_an_update(text: str, path: str, mirrors: tuple[str, ...],
                                            sha256: str | None) -> None:
    source = parse_source(text)
    assert (source.where, source.path, source.mirrors, source.sha256, source.text) == \
        (Where.URL, path, mirrors, sha256, text)


def test_a_checksum_for_an_update_on_a_device_or_the_medium() -> None:
    on_device = parse_source(f"LABEL=UPD:/u.img#sha256={HEX}")
    assert (on_device.where, on_device.path, on_device.sha256) == (Where.DEVICE, "/u.img", HEX)
    on_medium = parse_source(f"/LiveOS/u.img#sha256=sha256:{HEX}")
    assert (on_medium.where, on_medium.path, on_medium.sha256) == \
        (Where.MEDIUM, "/LiveOS/u.img", HEX)


@pytest.mark.parametrize(("text", "words"), [
    ("http://a/u.img,ftp://b/u.img", "ftp URLs are not supported"),
    ("http://a/u.img,http://me:pw@b/u.img", "a user or password in a URL is not supported"),
    (",".join(f"http://m{i}/u.img" for i in range(9)), "9 URLs for one update, more than 8"),
    ("http://a/u.img#sha256=1234", "not a SHA-256 checksum: '1234'"),
    (f"http://a/u.img#sha256={HEX},http://b/u.img", "not a SHA-256 checksum"),
    (f"http://a/u.img#sha256={HEX}#sha256={HEX}", "#sha256= given twice"),
    (f"#sha256={HEX}", "not an http(s) URL, DEVICE:/PATH or /PATH"),
    ("http://[::1/u.img", "not a valid URL (Invalid IPv6 URL)"),
    ("http://a/u.img,http://[::1/u.img", "not a valid URL (Invalid IPv6 URL)"),
    # a checksum written a little off must not leave the download unchecked
    (f"http://a/u.img#sha256={HEX}#", "#sha256= not at the end of the word"),
    (f"http://a/u.img#sha256={HEX}#x", "#sha256= not at the end of the word"),
    (f"http://a/u.img#SHA256={HEX}", "#sha256= not at the end of the word"),
    (f"http://a/u.img#sha256:{HEX}", "#sha256= not at the end of the word"),
    (f"/u.img#sha256={HEX}#", "#sha256= not at the end of the word"),
])
def test_bad_mirrors_and_checksums_are_refused_with_one_reason(text: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_source(text)
    assert words in caught.value.message
    assert "\n" not in caught.value.message


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Server]]:
    without_proxies(monkeypatch)
    with serving() as served:
        yield served


def test_a_download_from_a_mirror_checked_at_boot(live: tuple[ApplyOptions, Path],
                                                  web: tuple[str, Server],
                                                  tmp_path: Path) -> None:
    """The first URL is down, the mirror serves the file: applied when its
    checksum is the one on the command line, left out when it is not."""
    options, mounts = live
    url, httpd = web
    body = make_tar(tmp_path / "u.tar", {"etc/mirrored": b"yes\n"}).read_bytes()
    httpd.routes = {"/u.tar": Served(body), "/old.tar": Served(b"old")}
    good = hashlib.sha256(body).hexdigest()
    down = f"http://127.0.0.1:{free_port()}/u.tar"
    [bad] = updates.apply_all((f"{url}/old.tar,{url}/u.tar#sha256={'0' * 64}",), options,
                              mounts=mounts, deadline=30)
    assert not bad.applied and f"SHA-256 is {good}, not {'0' * 64}" in bad.reason
    assert not (options.root / "etc/mirrored").exists()
    [applied] = updates.apply_all((f"{down},{url}/u.tar#sha256={good}",), options,
                                  mounts=mounts, deadline=30)
    assert applied.applied, applied
    assert (options.root / "etc/mirrored").read_bytes() == b"yes\n"


@pytest.mark.root
def test_a_checksum_on_the_medium(live: tuple[ApplyOptions, Path], medium: Path) -> None:
    options, mounts = live
    data = make_tar(medium / "u.tar", {"etc/checked": b"1\n"}).read_bytes()
    good = hashlib.sha256(data).hexdigest()
    bad, applied = updates.apply_all((f"/u.tar#sha256={'1' * 64}", f"/u.tar#sha256={good}"),
                                     options, mounts=mounts, medium=os.fspath(medium))
    assert not bad.applied and "SHA-256 is" in bad.reason
    assert applied.applied and (options.root / "etc/checked").read_bytes() == b"1\n"


# ---------------------------------------------------------------- on the live medium

@pytest.mark.root
def test_good_broken_good_on_the_medium(live: tuple[ApplyOptions, Path], medium: Path) -> None:
    options, mounts = live
    make_tar(medium / "one.tar", {"lib/one.so": b"one\n"})
    truncated_tar(medium / "broken.tar")
    make_tar(medium / "two.tar", {"lib/libfoo.so": b"fixed\n", "etc/two": b"2\n"})
    outcomes = updates.apply_all(("/one.tar", "/broken.tar", "/two.tar"), options,
                                 mounts=mounts, medium=os.fspath(medium))
    assert [(o.text, o.applied) for o in outcomes] == [
        ("/one.tar", True), ("/broken.tar", False), ("/two.tar", True)]
    assert outcomes[0].reason == "" and outcomes[0].written >= 1
    assert outcomes[1].reason and "\n" not in outcomes[1].reason
    assert outcomes[1].line().startswith("left out /broken.tar: ")
    root = options.root
    assert (root / "usr/lib/one.so").read_bytes() == b"one\n"
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"fixed\n"
    assert (root / "etc/two").read_bytes() == b"2\n"
    assert os.readlink(root / "lib") == "usr/lib", "the link in the root is kept"
    assert not (root / "usr/lib/first.so").exists(), "nothing of a broken update lands"
    assert not (root / "usr/lib/second.so").exists()


@pytest.mark.root
def test_a_link_on_the_medium_that_leads_off_it_is_left_out(
        live: tuple[ApplyOptions, Path], medium: Path, tmp_path: Path) -> None:
    options, mounts = live
    elsewhere = make_tar(tmp_path / "elsewhere.tar", {"etc/planted": b"x\n"})
    os.symlink(elsewhere, medium / "abs.tar")
    os.symlink(os.path.relpath(elsewhere, medium), medium / "rel.tar")
    (medium / "dir").mkdir()
    make_tar(medium / "dir/good.tar", {"etc/good": b"g\n"})
    os.symlink("dir/good.tar", medium / "inside.tar")
    before = snapshot(options.root)
    outcomes = updates.apply_all(("/abs.tar", "/rel.tar", "/../elsewhere.tar",
                                  "/dir/../../elsewhere.tar"), options, mounts=mounts,
                                 medium=os.fspath(medium))
    assert [o.applied for o in outcomes] == [False] * 4
    assert all("leads off" in o.reason for o in outcomes), outcomes
    assert snapshot(options.root) == before
    [inside] = updates.apply_all(("/inside.tar",), options, mounts=mounts,
                                 medium=os.fspath(medium))
    assert inside.applied, inside
    assert (options.root / "etc/good").read_bytes() == b"g\n"


@pytest.mark.root
def test_a_missing_update_on_the_medium_is_left_out(live: tuple[ApplyOptions, Path],
                                                     medium: Path) -> None:
    options, mounts = live
    [outcome] = updates.apply_all(("/absent.tar",), options, mounts=mounts,
                                  medium=os.fspath(medium))
    assert not outcome.applied and "no such file" in outcome.reason


def test_no_medium_or_one_not_mounted_leaves_path_updates_out(
        live: tuple[ApplyOptions, Path], tmp_path: Path) -> None:
    options, mounts = live
    not_mounted = tmp_path / "medium"
    not_mounted.mkdir()
    make_tar(not_mounted / "u.tar", {"etc/u": b"u\n"})
    for medium in ("", os.fspath(not_mounted)):
        [outcome] = updates.apply_all(("/u.tar",), options, mounts=mounts, medium=medium)
        assert not outcome.applied
        assert "no live medium is mounted" in outcome.reason
    assert not (options.root / "etc/u").exists()


def test_an_unparsable_update_is_left_out_and_the_next_applied(
        live: tuple[ApplyOptions, Path], tmp_path: Path) -> None:
    options, mounts = live
    outcomes = updates.apply_all(("ftp://server/u.img", "relative.tar"), options,
                                 mounts=mounts)
    assert [o.reason for o in outcomes] == [
        "ftp URLs are not supported",
        "not an http(s) URL, DEVICE:/PATH or /PATH on the live medium"]


def test_a_url_outside_ascii_is_left_out_and_the_next_tried(
        live: tuple[ApplyOptions, Path], tmp_path: Path) -> None:
    """http.client cannot encode such a URL: its UnicodeEncodeError went
    through apply_all and the updates after it were never tried."""
    options, mounts = live
    outcomes = updates.apply_all(("http://127.0.0.1:1/\u00fc.img", "relative.tar"), options,
                                 mounts=mounts, deadline=5.0)
    assert [o.reason for o in outcomes] == [
        "cannot download http://127.0.0.1:1/\u00fc.img: a URL may hold no space, control "
        "character or character outside ASCII",
        "not an http(s) URL, DEVICE:/PATH or /PATH on the live medium"]


def test_outcomes_as_lines_and_dicts() -> None:
    applied, left = Outcome("/a.tar", True, written=3), Outcome("/b.tar", False, reason="bad")
    assert applied.line() == "applied /a.tar (3 entries)"
    assert left.line() == "left out /b.tar: bad"
    assert left.to_dict() == {"update": "/b.tar", "applied": False, "written": 0,
                              "reason": "bad", "dry_run": False}
    assert Outcome("/a.tar", True, dry_run=True).line() == \
        "would apply /a.tar (dry run: nothing written)"


# ---------------------------------------------------------------- on a device

def _ext4_image(path: Path, files: dict[str, bytes], tmp_path: Path,
                fstype: str = "ext4") -> Path:
    tree = tmp_path / f"{path.stem}-tree"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    tree.mkdir(exist_ok=True)
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-L", "UPDTEST", "-d", str(tree), str(path),
                    "8M"], check=True, capture_output=True)
    return path


@pytest.fixture
def loop_of(tmp_path: Path) -> Iterator[list[tuple[str, Path]]]:
    """Loop devices a test attaches (read-only), detached after."""
    attached: list[tuple[str, Path]] = []
    yield attached
    for dev, image in reversed(attached):
        blockdev.loop_teardown(dev, backing=image)


def _attach(loops: list[tuple[str, Path]], image: Path) -> str:
    dev = blockdev.loop_setup(image, read_only=True)
    loops.append((dev, image))
    return dev


@needs_loop
@pytest.mark.root
def test_an_update_on_a_device_is_applied_and_the_device_let_go(
        live: tuple[ApplyOptions, Path], tmp_path: Path,
        loop_of: list[tuple[str, Path]]) -> None:
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"lib/libfoo.so": b"from the device\n"})
    image = _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()}, tmp_path)
    dev = _attach(loop_of, image)
    [outcome] = updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert outcome.applied, outcome
    assert (options.root / "usr/lib/libfoo.so").read_bytes() == b"from the device\n"
    assert os.listdir(mounts) == [], "the mount directory is removed"
    assert _mounts_under(mounts) == [], "the device is unmounted"


@needs_loop
@pytest.mark.root
@pytest.mark.parametrize("fstype", ["ext2", "ext3"])
def test_an_update_on_an_older_ext_device(live: tuple[ApplyOptions, Path], tmp_path: Path,
                                          loop_of: list[tuple[str, Path]], fstype: str) -> None:
    """Each is mounted with the options its kind takes (ext2 has no journal)."""
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"etc/old": fstype.encode()})
    dev = _attach(loop_of, _ext4_image(tmp_path / "upd.img", {"upd.tar": upd.read_bytes()},
                                       tmp_path, fstype))
    [outcome] = updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert outcome.applied, outcome
    assert (options.root / "etc/old").read_bytes() == fstype.encode()
    assert os.listdir(mounts) == []


@needs_loop
@pytest.mark.root
def test_a_device_holding_no_known_filesystem_is_left_out(
        live: tuple[ApplyOptions, Path], tmp_path: Path,
        loop_of: list[tuple[str, Path]]) -> None:
    options, mounts = live
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * (1 << 20))
    dev = _attach(loop_of, blank)
    [outcome] = updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert not outcome.applied
    assert f"{dev}: holds no filesystem known here" in outcome.reason
    assert os.listdir(mounts) == []


def test_a_device_that_does_not_exist_is_left_out(live: tuple[ApplyOptions, Path]) -> None:
    options, mounts = live
    [outcome] = updates.apply_all(("/dev/loop987654:/u.tar",), options, mounts=mounts)
    assert not outcome.applied and "/dev/loop987654: no such device" in outcome.reason


@needs_loop
@pytest.mark.root
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interruption_goes_through_and_the_device_is_let_go(
        live: tuple[ApplyOptions, Path], tmp_path: Path, loop_of: list[tuple[str, Path]],
        monkeypatch: pytest.MonkeyPatch, interruption: type[BaseException]) -> None:
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"etc/x": b"x\n"})
    dev = _attach(loop_of, _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()},
                                       tmp_path))
    seen: list[str] = []

    def interrupted(spec: str, *args: object, **kwargs: object) -> None:
        seen.append(spec)
        assert _mounts_under(mounts), "the device is mounted while the update is read"
        raise interruption

    monkeypatch.setattr(updates, "apply_update", interrupted)
    with pytest.raises(interruption):
        updates.apply_all((f"{dev}:/upd.tar", "/never.tar"), options, mounts=mounts)
    assert len(seen) == 1 and seen[0].endswith("/upd.tar")
    assert _mounts_under(mounts) == [] and os.listdir(mounts) == []


# ---------------------------------------------------------------- hostile and odd lines

@needs_loop
@pytest.mark.root
def test_a_dev_path_that_resolves_to_a_file_is_no_device(
        live: tuple[ApplyOptions, Path], tmp_path: Path) -> None:
    """/dev/../PATH/image.ext4 is an image file, not a device: mount would
    set up a loop device on it by itself."""
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"etc/from-a-file": b"x\n"})
    image = _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()}, tmp_path)
    [outcome] = updates.apply_all((f"/dev/..{image}:/upd.tar",), options, mounts=mounts)
    assert not outcome.applied
    assert "not a block device" in outcome.reason
    assert not (options.root / "etc/from-a-file").exists()
    assert _mounts_under(mounts) == [] and os.listdir(mounts) == []


@needs_loop
@pytest.mark.root
def test_a_state_dir_named_through_a_link_in_its_path(
        live: tuple[ApplyOptions, Path], tmp_path: Path,
        loop_of: list[tuple[str, Path]]) -> None:
    """/var/run/dmoverlay, /var/run a link to /run: the device's mount point
    is named through the link, and an update on it is on it all the same."""
    options, _ = live
    (tmp_path / "run/dmoverlay").mkdir(parents=True, mode=0o700)
    (tmp_path / "var").mkdir()
    os.symlink("../run", tmp_path / "var/run")
    mounts = tmp_path / "var/run/dmoverlay"
    upd = make_tar(tmp_path / "upd.tar", {"etc/through": b"x\n"})
    dev = _attach(loop_of, _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()},
                                       tmp_path))
    [outcome] = updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert outcome.applied, outcome
    assert (options.root / "etc/through").read_bytes() == b"x\n"
    assert os.listdir(mounts) == []


def test_a_password_in_a_url_is_not_shown(live: tuple[ApplyOptions, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The console and the booted system's journal keep what is shown."""
    options, mounts = live
    url = "http://admin:s3cr3t@127.0.0.1:1/u.img"
    [outcome] = updates.apply_all((url,), options, mounts=mounts, deadline=5)
    assert not outcome.applied
    shown = outcome.line() + repr(outcome.to_dict()) + "".join(capsys.readouterr())
    assert "s3cr3t" not in shown
    assert "http://admin:***@127.0.0.1:1/u.img" in outcome.line()


def test_control_characters_in_an_update_are_not_sent_to_the_console(
        live: tuple[ApplyOptions, Path]) -> None:
    options, mounts = live
    [outcome] = updates.apply_all(("/a\x1b[2Jb\rc",), options, mounts=mounts)
    assert outcome.line().isprintable()
    assert "\\x1b[2Jb\\rc" in outcome.line()


@pytest.mark.root
def test_an_update_given_twice_is_applied_once(live: tuple[ApplyOptions, Path],
                                               medium: Path) -> None:
    options, mounts = live
    make_tar(medium / "one.tar", {"etc/one": b"1\n"})
    make_tar(medium / "two.tar", {"etc/two": b"2\n"})
    outcomes = updates.apply_all(("/one.tar", "/two.tar", "/one.tar"), options, mounts=mounts,
                                 medium=os.fspath(medium))
    assert [(o.text, o.applied) for o in outcomes] == [("/one.tar", True), ("/two.tar", True)]


def test_past_so_many_updates_the_rest_are_left_out(live: tuple[ApplyOptions, Path]) -> None:
    """A line of thousands (a command line file may hold 64 KiB) must not
    keep a boot waiting for each in turn."""
    options, mounts = live
    many = tuple(f"/u{i}.tar" for i in range(4000))
    outcomes = updates.apply_all(many, options, mounts=mounts)
    assert len(outcomes) == len(many)
    tried = [o for o in outcomes if "no live medium" in o.reason]
    assert len(tried) == updates.MAX_UPDATES
    rest = outcomes[updates.MAX_UPDATES:]
    assert {o.reason for o in rest} == {f"not tried: past the first {updates.MAX_UPDATES} updates"}


# ---------------------------------------------------------------- what setup left

def test_the_state_dir_is_made_when_missing_but_not_its_parents(tmp_path: Path) -> None:
    made = tmp_path / "run/dmoverlay"
    (tmp_path / "run").mkdir()
    assert updates.where_setup_left(made, "live") == (made, "")
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
    with pytest.raises(UsageError, match="no such directory to keep dmoverlay in"):
        updates.where_setup_left(tmp_path / "missing/dmoverlay", "live")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("case", ["link", "open"])
def test_a_state_dir_planted_by_another_is_refused(tmp_path: Path, case: str) -> None:
    state_dir = tmp_path / "dmoverlay"
    if case == "link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        state_dir.symlink_to(tmp_path / "elsewhere")
    else:
        state_dir.mkdir(mode=0o777)
        state_dir.chmod(0o777)
    with pytest.raises(OverlayError, match="not a private directory") as caught:
        updates.where_setup_left(state_dir, "live")
    assert caught.value.hint


def test_a_hostile_state_file_is_said_and_its_medium_not_used(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = make_state(tmp_path)
    state.medium = "/etc"  # not a mount of its own
    plant(tmp_path / "state", state.to_json())
    assert updates.where_setup_left(tmp_path / "state", "live") == (tmp_path / "state", "")
    assert "warning: " in capsys.readouterr().err


def test_the_medium_setup_recorded(tmp_path: Path) -> None:
    work = tmp_path / "state/live"
    state = make_state(tmp_path, Step(StepKind.DIR, f"{work}"),
                       Step(StepKind.DIR, f"{work}/media0"), Step(StepKind.MOUNT, f"{work}/media0"))
    state.medium = f"{work}/media0"
    plant(tmp_path / "state", state.to_json())
    assert updates.where_setup_left(tmp_path / "state", "live")[1] == f"{work}/media0"


@pytest.mark.parametrize(("text", "seen"), [
    ("http://u:p@ss@host/x@y", "http://u:***@host/x@y"),
    ("see https://me:pw@h:8080/a and http://h/b", "see https://me:***@h:8080/a and http://h/b"),
    ("http://user@host/x", "http://user@host/x"),  # no password to hide
    ("LABEL=a:b@c:/u.img", "LABEL=a:b@c:/u.img"),
    ("/a\tb", "/a\\tb"),
])
def test_what_is_shown_of_an_update(text: str, seen: str) -> None:
    assert updates.shown(text) == seen


def _mount_options_under(top: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [fields[3] for fields in (line.split() for line in lines)
            if fields[1].startswith(f"{top}/")]


@needs_loop
@pytest.mark.root
def test_a_device_is_read_without_writing_to_it(
        live: tuple[ApplyOptions, Path], tmp_path: Path,
        loop_of: list[tuple[str, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only ext4 mount replays a journal that needs it, writing to
    the device the user gave to be read; and its superblock may ask that an
    error panic the kernel (a boot must not stop for an update)."""
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"etc/unwritten": b"x\n"})
    image = _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()}, tmp_path)
    subprocess.run(["tune2fs", "-e", "panic", str(image)], check=True, capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(image)], check=True,
                   capture_output=True)  # after tune2fs: it would recover the journal
    before = image.read_bytes()
    dev = blockdev.loop_setup(image, read_only=False)
    loop_of.append((dev, image))
    seen: list[str] = []

    def watched(spec: str, opts: ApplyOptions, *, deadline: float, **kw: object) -> Result:
        seen.extend(_mount_options_under(mounts))
        return apply_update(spec, opts, deadline=deadline, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(updates, "apply_update", watched)
    [outcome] = updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert outcome.applied, outcome
    loop_of.pop()
    blockdev.loop_teardown(dev, backing=image)  # what the device was sent reaches the file
    assert image.read_bytes() == before, "nothing was written to the device"
    [mounted] = seen
    assert {"ro", "nodev", "nosuid", "noexec", "norecovery",
            "errors=remount-ro"} <= set(mounted.split(","))


@pytest.mark.root
def test_a_directory_on_the_medium_is_an_update(live: tuple[ApplyOptions, Path],
                                                medium: Path) -> None:
    options, mounts = live
    (medium / "updates/lib").mkdir(parents=True)
    (medium / "updates/lib/libfoo.so").write_bytes(b"from a directory\n")
    os.symlink("/etc/shadow", medium / "updates/lib/shadow-link")  # a link, kept as one
    [outcome] = updates.apply_all(("/updates/",), options, mounts=mounts,
                                  medium=os.fspath(medium))
    assert outcome.applied, outcome
    assert (options.root / "usr/lib/libfoo.so").read_bytes() == b"from a directory\n"
    assert os.readlink(options.root / "usr/lib/shadow-link") == "/etc/shadow"


def test_a_state_whose_medium_is_the_new_root_is_not_taken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Setup mounts the medium in its work directory, never on the target:
    updates named by a path are not read from the root they update."""
    state = make_state(tmp_path, Step(StepKind.MOUNT, f"{tmp_path}/sysroot"))
    state.medium = state.target
    plant(tmp_path / "state", state.to_json())
    assert updates.where_setup_left(tmp_path / "state", "live")[1] == ""
    assert "is the root it updates" in capsys.readouterr().err


@needs_loop
@pytest.mark.root
def test_an_interruption_just_after_the_mount_goes_through_and_unmounts(
        live: tuple[ApplyOptions, Path], tmp_path: Path, loop_of: list[tuple[str, Path]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (as an exception) once mount(8) has mounted, before it
    returned: the mount is undone and the interruption is not taken for an
    update that failed (removing a directory still mounted on would be)."""
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"etc/x": b"x\n"})
    dev = _attach(loop_of, _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()},
                                       tmp_path))
    real_mount = blockdev.mount

    def mounted_then_interrupted(device: str, where: str, *, fstype: str, options: str) -> None:
        real_mount(device, where, fstype=fstype, options=options)
        raise KeyboardInterrupt

    monkeypatch.setattr(blockdev, "mount", mounted_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert _mounts_under(mounts) == [] and os.listdir(mounts) == []
    assert not (options.root / "etc/x").exists()


@needs_loop
@pytest.mark.root
def test_an_update_applied_is_said_applied_when_letting_the_device_go_fails(
        live: tuple[ApplyOptions, Path], tmp_path: Path, loop_of: list[tuple[str, Path]],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The root has the update: the outcome must not say it was left out."""
    options, mounts = live
    upd = make_tar(tmp_path / "upd.tar", {"etc/landed": b"x\n"})
    dev = _attach(loop_of, _ext4_image(tmp_path / "upd.ext4", {"upd.tar": upd.read_bytes()},
                                       tmp_path))
    real_unmount = blockdev.unmount

    def unmounted_but_failed(where: str, *, lazy: bool = False) -> None:
        real_unmount(where, lazy=lazy)
        raise BlockDevError(f"umount {where}: target is busy")

    monkeypatch.setattr(blockdev, "unmount", unmounted_but_failed)
    [outcome] = updates.apply_all((f"{dev}:/upd.tar",), options, mounts=mounts)
    assert (options.root / "etc/landed").read_bytes() == b"x\n"
    assert outcome.applied, outcome
    assert "target is busy" in capsys.readouterr().err


def test_the_updates_share_one_deadline(live: tuple[ApplyOptions, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A boot waits for the updates in turn: --timeout bounds them all, not
    each (16 slow downloads would hold a boot for 16 times as long)."""
    options, mounts = live
    given: list[float] = []

    def slow(spec: str, opts: ApplyOptions, *, deadline: float, **kw: object) -> Result:
        given.append(deadline)
        time.sleep(0.4)
        raise SourceError(f"cannot download {spec}: not done after {deadline:g} s")

    monkeypatch.setattr(updates, "apply_update", slow)
    urls = tuple(f"http://10.0.2.2/u{i}.img" for i in range(5))
    outcomes = updates.apply_all(urls, options, mounts=mounts, deadline=1.0)
    assert len(given) == 3 and given[0] == pytest.approx(1.0, abs=0.05)
    assert given[1] == pytest.approx(0.6, abs=0.1) and given[2] == pytest.approx(0.2, abs=0.1)
    assert [o.reason for o in outcomes[3:]] == ["not tried: the updates' 1 s are up"] * 2
