"""Journal records: written cheaply for the two kinds every file has, read
back exactly, and a torn last line dropped; anything else that is not a
record refuses the journal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.apply.journal import _FIELDS, Log, Record, next_txn, txn_names
from dmoverlay.core.errors import JournalError

names = st.text(st.characters(codec="utf-8") | st.sampled_from(["\udcff", "\udc80", '"', "\\"]))


@given(st.sampled_from(sorted(_FIELDS)), st.integers(0, 10**6), st.sampled_from(["root", "run"]),
       names, names, st.integers(0, 2**64), st.integers(-2**63, 2**63), st.integers(0, 2**40))
def test_records_are_json_and_read_back(step: str, n: int, tree: str, path: str, tmp: str,
                                        ino: int, time: int, size: int) -> None:
    values = {"n": n, "tree": tree, "path": path, "tmp": tmp, "ino": ino, "atime_ns": time,
              "mtime_ns": time, "size": size, "time_ns": abs(time)}
    record = Record(step, **{k: values[k] for k in _FIELDS[step]})  # type: ignore[arg-type]
    line = record.to_json()
    assert "\n" not in line and line.isascii()
    assert Record.from_json(line) == record


def test_a_ready_line_without_size_reads_as_unknown() -> None:
    assert Record.from_json(Record("ready", 3, ino=9).to_json()) == Record("ready", 3, ino=9)
    assert Record("ready", 3, ino=9).size == -1


def test_a_torn_last_line_is_dropped() -> None:
    lines = [Record("put", 1, "root", "a", tmp="t1").to_json(),
             Record("ready", 1, ino=7).to_json(), '{"step":"put","n":2,"tr']
    log = Log.parse("\n".join(lines))
    assert [r.step for r in log.records] == ["put", "ready"]
    assert log.inode_of(1) == 7
    assert log.inode_of(2) == 0
    assert not log.done


def test_a_whole_last_line_without_its_newline_is_kept() -> None:
    assert Log.parse('{"step":"begin","time_ns":5}\n{"step":"done"}').done


BAD_LINES = [
    ('"just a string"', "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"step":"put","n":"x","tree":"root","path":"a","tmp":"t"}', "'n' is not an integer"),
    ('{"step":"put","n":true,"tree":"root","path":"a","tmp":"t"}', "'n' is not an integer"),
    ('{"step":"put","n":1.5,"tree":"root","path":"a","tmp":"t"}', "'n' is not an integer"),
    ('{"step":"put","n":-1,"tree":"root","path":"a","tmp":"t"}', "'n' is negative"),
    ('{"step":"put","n":1,"tree":"root","path":["a"],"tmp":"t"}', "'path' is not a string"),
    ('{"step":"put","n":1,"tree":"root","path":"a","tmp":"t","evil":1}', "unknown field"),
    ('{"step":"ready","n":1,"tmp":"t"}', "unknown field 'tmp'"),
    ('{"step":"rmtree","path":"/"}', "unknown step"),
    ('{"n":1}', "unknown step"),
    ("{" * 100000, "not a journal record"),
    ("not json", "not a journal record"),
]


@pytest.mark.parametrize(("line", "words"), BAD_LINES, ids=[w for _, w in BAD_LINES])
def test_a_line_that_is_not_a_record_refuses_the_journal(line: str, words: str) -> None:
    with pytest.raises(JournalError, match="line 2") as caught:
        Log.parse(f'{{"step":"begin","time_ns":1}}\n{line}\n{{"step":"done"}}\n', "j/000001/log",
                  "000001")
    assert words in caught.value.message
    assert caught.value.hint is not None and "000001.bad" in caught.value.hint


def _put(n: int, path: str, tmp: str = "", tree: str = "root") -> str:
    return Record("put", n, tree, path, tmp=tmp or f".dmoverlay-000001-{n}").to_json()


BAD_RECORDS = [
    ([_put(1, "/etc/passwd")], "absolute"),
    ([_put(1, ".dmoverlay/journal/000001/log")], "dmoverlay's own journal"),
    ([_put(1, "etc/x\0y")], "NUL"),
    ([_put(1, "/".join(["d" * 200] * 21))], "longer than 4095"),
    ([_put(1, "../../etc/passwd")], "'..'"),
    ([_put(1, "etc/../../x")], "'..'"),
    ([_put(1, "etc//x")], "an empty component"),
    ([_put(1, "")], "empty"),
    ([_put(1, "etc/./x")], "'.' component"),
    ([_put(1, "etc/x", tmp="../../../etc/shadow")], "temporary name"),
    ([_put(1, "etc/x", tmp="/etc/shadow")], "temporary name"),
    ([_put(1, "etc/x", tmp=".dmoverlay-000001-2")], "temporary name"),
    ([_put(1, "etc/x", tmp=".dmoverlay-000002-1")], "temporary name"),
    ([_put(1, "etc/x", tree="host")], "neither root nor run"),
    ([_put(1, "etc/x", tree="")], "neither root nor run"),
    ([_put(1, "etc/x"), _put(1, "etc/y")], "numbered twice"),
    ([Record("remove", 1, "root", "..").to_json()], "'..'"),
    ([Record("mkdir", 1, "root", "a/..").to_json()], "'..'"),
    ([Record("times", tree="root", path="/etc").to_json()], "absolute"),
    ([Record("ready", 4, ino=1).to_json()], "not an earlier put"),
    ([_put(1, "a"), Record("ready", 1, ino=1).to_json(), Record("ready", 1, ino=2).to_json()],
     "ready twice"),
    ([Record("done").to_json(), _put(1, "a")], "after \"done\""),
    ([_put(1, "run/x", tree="run")], "not given with --run-dir"),
]


@pytest.mark.parametrize(("lines", "words"), BAD_RECORDS, ids=[w for _, w in BAD_RECORDS])
def test_a_record_this_transaction_could_not_have_written_refuses_it(lines: list[str],
                                                                     words: str) -> None:
    log = Log.parse("".join(f"{line}\n" for line in lines))
    with pytest.raises(JournalError) as caught:
        log.check("j/000001", "000001", ("root",))
    assert words in caught.value.message, caught.value.message


def test_a_real_path_may_hold_any_name_the_root_holds() -> None:
    """Reached through a link, a path may hold a control character or a name
    like a temporary's: the journal of such an apply stays good."""
    lines = [_put(1, "srv/.dmoverlay-x/a"), _put(2, "srv/new\nline")]
    log = Log.parse("".join(f"{line}\n" for line in lines))
    log.check("j/000001/log", "000001", ("root",))


def test_transaction_names() -> None:
    assert txn_names(["000002", "000010", "x", "000003.failed", "١٢", "²", "9" * 19,
                      "000001"]) == ["000001", "000002", "000010"]
    assert next_txn(["000009", "junk"]) == "000010"
    assert next_txn([]) == "000001"
    with pytest.raises(JournalError, match="last number"):
        next_txn(["9" * 18])
