"""`status --prometheus`: overlays' status in Prometheus' text exposition
format (version 0.0.4), for node_exporter's textfile collector or any
scraper.  Pure: statuses in, text out.

Every family is a gauge, with its HELP and TYPE once and its samples
together.  `dmoverlay_up` is 0 for an overlay whose status could not be
read (not set up, its state refused, its devices gone): the other families
then have no sample for it, so an alert on fill never fires on stale data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dmoverlay.overlay.status import Status

# the snapshot states an alert may name, each a 0/1 sample (StateSet style)
STATES = ("active", "overflow", "invalid", "full", "read-only", "failed")

_FAMILIES = (
    ("dmoverlay_up", "1 if the overlay's status was read, 0 if not (not set up, its "
                     "state refused, its devices gone)."),
    ("dmoverlay_fill_ratio", "How full the layer that takes writes is, 0 to 1, counting "
                             "the RAM left in the tmpfs holding its file."),
    ("dmoverlay_layer_used_bytes", "Bytes of changes a layer holds."),
    ("dmoverlay_layer_size_bytes", "A layer's size in bytes (the base's: the image's)."),
    ("dmoverlay_ram_free_bytes", "Room left in the tmpfs holding the RAM layer's file."),
    ("dmoverlay_snapshot_state", "1 for the state the layer's snapshot is in, 0 for the "
                                 "others (overflow or invalid: writes fail)."),
)


def exposition(found: Sequence[tuple[str, Status | None]]) -> str:
    """The text for (name, status) pairs, a status None where it could not
    be read."""
    samples: dict[str, list[str]] = {family: [] for family, _ in _FAMILIES}
    for name, st in found:
        samples["dmoverlay_up"].append(_sample("dmoverlay_up", {"name": name},
                                               0 if st is None else 1))
        if st is not None:
            for family, labels, value in _status_samples(st):
                samples[family].append(_sample(family, {"name": name, **labels}, value))
    lines = []
    for family, text in _FAMILIES:
        if not samples[family]:
            continue
        lines += [f"# HELP {family} {_escape_help(text)}", f"# TYPE {family} gauge",
                  *samples[family]]
    return "".join(f"{line}\n" for line in lines)


def _status_samples(st: Status) -> Iterable[tuple[str, dict[str, str], float]]:
    yield "dmoverlay_fill_ratio", {}, st.fill / 100
    if st.ram_free is not None:
        yield "dmoverlay_ram_free_bytes", {}, st.ram_free
    for layer in st.layers():
        labels = {"layer": layer.kind}
        if layer.used is not None:
            yield "dmoverlay_layer_used_bytes", labels, layer.used
        if layer.size is not None:
            yield "dmoverlay_layer_size_bytes", labels, layer.size
        if layer.state is not None:
            known = STATES if layer.state in STATES else (*STATES, layer.state)
            for word in known:
                yield ("dmoverlay_snapshot_state", {**labels, "state": word},
                       1 if word == layer.state else 0)


def _sample(family: str, labels: dict[str, str], value: float) -> str:
    inside = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels.items())
    return f"{family}{{{inside}}} {_number(value)}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape_label(text: str) -> str:
    # the format's three escapes in a label value: backslash, quote, newline
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
