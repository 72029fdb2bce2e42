"""`status --prometheus`: the text a Prometheus parser reads back to the
numbers status has, families whole, label values escaped."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay.metrics import STATES, exposition
from dmoverlay.overlay.status import Status

READONLY = Status("live", "/sysroot", "active", used=MiB, total=32 * MiB, ram_free=64 * MiB,
                  mode="readonly", overlay="/o", kept_used=4 * MiB, kept_total=16 * MiB,
                  image="/img", base_size=2 * GiB, cow_file="/run/c")


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge"
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_every_number_of_the_status_is_read_back() -> None:
    got = parsed(exposition([("live", READONLY)]))
    live = (("name", "live"),)
    assert got[("dmoverlay_up", live)] == 1
    assert got[("dmoverlay_fill_ratio", live)] == pytest.approx(READONLY.fill / 100)
    assert got[("dmoverlay_ram_free_bytes", live)] == 64 * MiB
    for layer, used, size in (("base", None, 2 * GiB), ("store", 4 * MiB, 16 * MiB),
                              ("ram", MiB, 32 * MiB)):
        labels = (("layer", layer), *live)
        assert got.get(("dmoverlay_layer_used_bytes", labels)) == used
        assert got[("dmoverlay_layer_size_bytes", labels)] == size
    states = {dict(labels)["state"]: value for (family, labels), value in got.items()
              if family == "dmoverlay_snapshot_state"}
    assert states == {word: (1 if word == "active" else 0) for word in STATES}


def test_an_overlay_not_read_is_up_0_and_nothing_else() -> None:
    text = exposition([("live", None)])
    assert parsed(text) == {("dmoverlay_up", (("name", "live"),)): 0}
    assert text == ("# HELP dmoverlay_up 1 if the overlay's status was read, 0 if not (not "
                    "set up, its state refused, its devices gone).\n"
                    "# TYPE dmoverlay_up gauge\n"
                    'dmoverlay_up{name="live"} 0\n')


def test_each_family_is_said_once_with_its_samples_together() -> None:
    text = exposition([("a", READONLY), ("b", None), ("c", READONLY)])
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))
    order = [line.split("{")[0] for line in text.splitlines() if not line.startswith("#")]
    assert order == sorted(order, key=families.index)  # never interleaved
    assert parsed(text)[("dmoverlay_up", (("name", "b"),))] == 0


def test_a_state_no_list_knows_is_still_said() -> None:
    odd = Status("live", "/sysroot", "merging", used=0, total=MiB, ram_free=None,
                 mode="persistent", overlay="/o")
    got = parsed(exposition([("live", odd)]))
    assert got[("dmoverlay_snapshot_state",
                (("layer", "store"), ("name", "live"), ("state", "merging")))] == 1


@pytest.mark.parametrize("name", ['a"b', "back\\slash", "new\nline", "ünï"])
def test_label_values_are_escaped(name: str) -> None:
    """Names setup accepts hold none of these; the writer does not rely on it."""
    got = parsed(exposition([(name, None)]))
    assert got == {("dmoverlay_up", (("name", name),)): 0}
