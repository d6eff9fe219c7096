"""The stream store that ``infer`` writes and ``score`` and ``evaluate`` read: the four raw
stream maps and the foreground of each test image, with its ids and labels."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import Store, open_store
from pipeline.errors import InputError
from pipeline.scoring import STREAM_NAMES


def open_streams(path: Path) -> tuple[Store, list[str], list[int], int]:
    """The stream store at ``path`` with its ids, labels and map size S, checked: every map
    and ``fg`` is (N, S, S) with N the number of ids and of labels."""
    streams = open_store(path)
    ids = streams.ids
    labels = streams.attrs.get("labels")
    if not isinstance(labels, list) or len(ids) != len(labels):
        raise InputError(f"{path}: attribute 'labels' missing or not one per id "
                         "(re-run the infer stage)")
    n = len(ids)
    shape = None
    for name in (*STREAM_NAMES, "fg"):
        if name not in streams:
            raise InputError(f"{path}: no array {name!r} (re-run the infer stage)")
        found = tuple(streams[name].shape)
        shape = shape or found
        if len(found) != 3 or found[0] != n or found[1] != found[2] or found != shape:
            raise InputError(f"{path}: array {name!r} has shape {found}, expected ({n}, S, S) "
                             "like the other stream maps")
    assert shape is not None
    return streams, ids, [int(v) for v in labels], int(shape[1])
