"""Journal records: written cheaply for the two kinds every file has, read
back exactly, and a torn last line dropped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.journal import Log, Record, _encode

names = st.text(st.characters(codec="utf-8") | st.sampled_from(["\udcff", "\udc80", '"', "\\"]))


@given(st.sampled_from(["put", "ready", "mkdir", "remove", "times", "done"]),
       st.integers(0, 10**6), st.sampled_from(["", "root", "run"]), names, names,
       st.integers(0, 2**64))
def test_records_are_json_and_read_back(step: str, n: int, tree: str, path: str, tmp: str,
                                        ino: int) -> None:
    record = Record(step, n, tree, path, tmp=tmp, ino=ino if step == "ready" else 0)
    line = record.to_json()
    if step != "ready":  # a "ready" record has only its n and inode
        assert line == _encode({k: v for k, v in record.__dict__.items() if v or k == "step"})
        assert Record.from_json(line) == record
    assert "\n" not in line


def test_a_torn_last_line_is_dropped() -> None:
    lines = [Record("put", 1, "root", "a", tmp="t1").to_json(),
             Record("ready", 1, ino=7).to_json(), '{"step":"put","n":2,"tr']
    log = Log.parse("\n".join(lines))
    assert [r.step for r in log.records] == ["put", "ready"]
    assert log.inode_of(1) == 7
    assert log.inode_of(2) == 0
    assert not log.done
