"""Zarr artifact stores: sharded, deterministic, atomic, lazy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import StoreWriter, atomic_dir, atomic_write_json, open_store
from pipeline.errors import InputError


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _write(path: Path, n: int = 40, batch: int = 7, value_offset: int = 0) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    with StoreWriter(path, attrs={"ids": [f"good/{i:03d}" for i in range(n)], "stage": "t"}) as w:
        w.create("rgb", n, (32, 32, 3), np.uint8)
        w.create("feat", n, (8, 4, 4), np.float16)
        for start in range(0, n, batch):
            w.append("rgb", images[start : start + batch] + value_offset)
            w.append("feat", np.full((min(batch, n - start), 8, 4, 4), start, np.float16))
        w.write("labels", np.arange(n) % 2)


def test_roundtrip_lazy_and_sharded(tmp_path, monkeypatch):
    import pipeline.artifacts as artifacts

    monkeypatch.setattr(artifacts, "SHARD_BYTES", 32 * 32 * 3 * 16)  # 16 samples per shard
    path = tmp_path / "s.zarr"
    _write(path)
    store = open_store(path)
    assert len(store) == 40
    assert store["rgb"].shards == (16, 32, 32, 3)
    assert store["feat"].dtype == np.float16
    assert float(store["feat"][8, 0, 0, 0]) == 7.0
    assert store.attrs["ids"][3] == "good/003"
    batches = list(store.iter_batches(["rgb", "labels"], 16))
    assert [len(b["rgb"]) for b in batches] == [16, 16, 8]
    # a handful of files, not one per chunk
    assert sum(1 for f in path.rglob("*") if f.is_file()) < 12


def test_identical_input_gives_identical_bytes(tmp_path):
    _write(tmp_path / "a.zarr")
    _write(tmp_path / "b.zarr")
    assert _digest(tmp_path / "a.zarr") == _digest(tmp_path / "b.zarr")
    _write(tmp_path / "c.zarr", value_offset=1)
    assert _digest(tmp_path / "a.zarr") != _digest(tmp_path / "c.zarr")


def test_interrupted_write_leaves_no_store(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        with StoreWriter(path, attrs={}) as w:
            w.create("x", 10, (4,), np.float32)
            w.append("x", np.zeros((5, 4), np.float32))
            raise RuntimeError("killed")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_incomplete_array_is_refused_and_old_store_kept(tmp_path):
    path = tmp_path / "s.zarr"
    _write(path)
    before = _digest(path)
    with pytest.raises(ValueError, match="5 samples written, 10 declared"):
        with StoreWriter(path, attrs={}) as w:
            w.create("x", 10, (4,), np.float32)
            w.append("x", np.zeros((5, 4), np.float32))
    assert _digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_atomic_dir_and_stale_temporaries(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    with pytest.raises(KeyError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise KeyError("boom")
    assert not out.exists() and not stale.exists()
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "m.json", {"b": 1, "a": np.float32(0.5).item()})
    assert (out / "m.json").read_text() == '{\n  "a": 0.5,\n  "b": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="artifact store not found"):
        open_store(tmp_path / "nothing.zarr")
    _write(tmp_path / "s.zarr")
    with pytest.raises(InputError, match="no array 'depth'"):
        open_store(tmp_path / "s.zarr")["depth"]
