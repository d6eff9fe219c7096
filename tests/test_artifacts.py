"""Zarr artifact stores: sharded, deterministic, atomic, lazy."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import StoreWriter, atomic_dir, atomic_write_json, open_store
from pipeline.errors import InputError, OutputError, ResourceError


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


# ---- integrity: missing or damaged data is never read as valid data --------------------------

def _small_store(path: Path, zeros: bool = False) -> None:
    """Three shards of 4 samples (the last one short), ids good/000..good/009."""
    data = np.zeros((10, 4, 4), np.float32) if zeros else np.arange(160, dtype=np.float32).reshape(10, 4, 4) + 1
    with StoreWriter(path, attrs={"ids": [f"good/{i:03d}" for i in range(10)], "stage": "infer"},
                     shard_bytes=4 * 4 * 4 * 4) as w:
        w.write("x", data)


def test_all_shards_are_written_even_when_empty(tmp_path):
    _small_store(tmp_path / "s.zarr", zeros=True)
    assert sorted(p.name for p in (tmp_path / "s.zarr/x/c").iterdir()) == ["0", "1", "2"]
    assert float(open_store(tmp_path / "s.zarr")["x"][:].sum()) == 0.0


def _damage(path: Path, how: str) -> None:
    shard = path / "x/c/1/0/0"
    if how == "delete_shard":
        shard.unlink()
    elif how == "empty_shard":
        shard.write_bytes(b"")
    elif how == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:40])
    elif how == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[12] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "flip_index":
        data = bytearray(shard.read_bytes())
        data[-9] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "truncate_array_json":
        meta = path / "x/zarr.json"
        meta.write_text(meta.read_text()[:50])
    elif how == "delete_array":
        import shutil

        shutil.rmtree(path / "x")
    elif how == "truncate_group_json":
        meta = path / "zarr.json"
        meta.write_text(meta.read_text()[:30])


@pytest.mark.parametrize("how", ["delete_shard", "empty_shard", "truncate_shard", "flip_byte",
                                 "flip_index", "truncate_array_json", "delete_array",
                                 "truncate_group_json"])
def test_damaged_store_is_one_clear_error(tmp_path, how):
    path = tmp_path / "s.zarr"
    _small_store(path)
    _damage(path, how)
    with pytest.raises(InputError) as err:
        open_store(path)["x"][:]
    message = str(err.value)
    assert str(path) in message and "damaged or incomplete" in message
    assert "dvc checkout" in message and "re-run" in message
    if how not in ("truncate_group_json", "truncate_array_json"):
        assert "'x'" in message
    if how in ("delete_shard", "empty_shard", "truncate_shard", "flip_byte", "flip_index"):
        assert "good/004" in message  # the samples of shard 1
        assert "`infer` stage" in message


def test_read_of_an_undamaged_shard_still_works(tmp_path):
    path = tmp_path / "s.zarr"
    _small_store(path)
    _damage(path, "flip_byte")
    store = open_store(path)
    assert float(store["x"][0, 0, 0]) == 1.0  # shard 0 is intact
    assert float(store["x"][6, 0, 0]) == 97.0  # each chunk has its own checksum
    with pytest.raises(InputError, match=r"samples good/004\)"):
        store["x"][4]


# ---- nothing private or stale is left behind ------------------------------------------------

def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "m.json", {"a": 1})
            fd, private = tempfile.mkstemp(dir=tmp)  # 0600, as safetensors' save_file writes
            os.close(fd)
        atomic_write_json(tmp_path / "top.json", {})
        _small_store(tmp_path / "s.zarr")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == dir_mode and _mode(tmp_path / "s.zarr") == dir_mode
    assert _mode(tmp_path / "out/m.json") == file_mode
    assert _mode(tmp_path / "out" / Path(private).name) == file_mode
    assert _mode(tmp_path / "top.json") == file_mode
    assert _mode(tmp_path / "s.zarr/x/c/0/0/0") == file_mode


def test_stale_old_and_tmp_siblings_are_removed_by_the_next_write(tmp_path):
    (tmp_path / ".s.zarr.old-123").mkdir()
    (tmp_path / ".s.zarr.tmp-dead").mkdir()
    (tmp_path / ".m.json.tmp-dead").write_text("x")
    _small_store(tmp_path / "s.zarr")
    atomic_write_json(tmp_path / "m.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "s.zarr"]


def test_failed_write_removes_the_parent_folders_it_created(tmp_path):
    (tmp_path / "artifacts").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "artifacts/prepare/disc"):
            raise RuntimeError("bad sample")
    assert list((tmp_path / "artifacts").iterdir()) == []
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "artifacts/streams/disc/k1-s0.zarr") as w:
            w.create("x", 2, (2,), np.float32)
            raise RuntimeError("killed")
    assert list((tmp_path / "artifacts").iterdir()) == []


# ---- one writer per output; only dead writers' temporaries are removed -----------------------

HOLD = """
import sys, time
from pathlib import Path
from pipeline.artifacts import atomic_dir, atomic_write_text
out, go = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_dir(out) as tmp:
    atomic_write_text(tmp / "first.txt", "1")
    print("writing", flush=True)
    while not go.exists():
        time.sleep(0.02)
    atomic_write_text(tmp / "second.txt", "2")
"""


def _holder(out: Path, go: Path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    return proc


def test_a_second_writer_of_one_output_fails_while_the_first_finishes(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    first = _holder(out, go)  # another process writes first
    with pytest.raises(OutputError, match=rf"another process is writing this output \(process "
                                          rf"{first.pid}"):
        with atomic_dir(out) as tmp:
            (tmp / "mine.txt").write_text("x")
    go.touch()
    assert first.wait(30) == 0, first.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == ["first.txt", "second.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out"]  # no lock, no temporary


def test_the_first_writer_wins_when_it_is_this_process(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "m.json", {"a": 1})
        second = subprocess.run([sys.executable, "-c", HOLD, str(out), str(tmp_path / "go")],
                                env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "another process is writing this output" in \
            second.stderr and f"process {os.getpid()}" in second.stderr
        atomic_write_json(tmp / "n.json", {"b": 2})
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "n.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_temporary_is_kept_a_dead_ones_removed(tmp_path):
    import subprocess

    from pipeline.outputs import start_time

    live = subprocess.Popen(["sleep", "30"])
    try:
        mine = tmp_path / f".s.zarr.tmp-{live.pid}-{start_time(live.pid)}-abc"
        mine.mkdir()  # a writer that does not hold the lock (another host, an old version)
        dead = tmp_path / f".s.zarr.tmp-{live.pid}-{start_time(live.pid) + 1}-abc"  # pid reused
        dead.mkdir()
        _small_store(tmp_path / "s.zarr")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.zarr", mine.name])
    finally:
        live.kill()
        live.wait()
    _small_store(tmp_path / "s.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_a_temporary_removed_while_writing_is_never_renamed_into_place(tmp_path):
    import shutil

    path = tmp_path / "s.zarr"
    _small_store(path)
    before = _digest(path)
    with pytest.raises(OutputError, match="removed or replaced by another process"):
        with StoreWriter(path, shard_bytes=64) as w:
            w.create("x", 10, (4,), np.float32)
            w.append("x", np.ones((5, 4), np.float32))
            for tmp in tmp_path.glob(".s.zarr.tmp-*"):
                shutil.rmtree(tmp)  # `rm -rf .s.zarr.tmp-*` by hand; zarr recreates folders
            w.append("x", np.ones((5, 4), np.float32))
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_a_temporary_removed_inside_one_of_zarrs_writes_is_the_same_one_error(tmp_path,
                                                                              monkeypatch):
    """The removal can land inside a write of zarr's own (between its .partial file and the
    link into place, as `rm -rf` during `cmds-ad prepare` once did): zarr's FileNotFoundError
    becomes the error that names the output and says what happened."""
    import shutil

    out = tmp_path / "prepare/disc"
    link = os.link

    def removed_first(src, dst, *args, **kwargs):
        for tmp in out.parent.glob(".disc.tmp-*"):
            shutil.rmtree(tmp)
        return link(src, dst, *args, **kwargs)

    with pytest.raises(OutputError, match=r"prepare/disc: its temporary \.disc\.tmp-\S+ \(while "
                       r"writing train\.zarr in it\) was removed or replaced by another process"):
        with atomic_dir(out) as tmp:
            with StoreWriter(tmp / "train.zarr") as writer:
                monkeypatch.setattr(os, "link", removed_first)
                writer.create("x", 10, (4,), np.float32)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_finished_store_removed_from_the_folder_being_written_is_noticed(tmp_path):
    import shutil

    out = tmp_path / "prepare/disc"
    with pytest.raises(OutputError, match="train.zarr was removed from its temporary"):
        with atomic_dir(out) as tmp:
            _small_store(tmp / "train.zarr")
            shutil.rmtree(tmp / "train.zarr")
            _small_store(tmp / "test.zarr")
    assert list(tmp_path.iterdir()) == []


def test_a_store_missing_a_shard_at_the_end_is_not_renamed(tmp_path, monkeypatch):
    import pipeline.artifacts as artifacts

    real = artifacts._ArrayAppender.close

    def close_then_lose_a_shard(self):
        real(self)
        (Path(self.array.store.root) / "x/c/1/0/0").unlink()  # deleted by someone else

    monkeypatch.setattr(artifacts._ArrayAppender, "close", close_then_lose_a_shard)
    with pytest.raises(OutputError, match=r"s.zarr: what was written was removed by another "
                                          r"process while this one wrote it \(array 'x'"):
        _small_store(tmp_path / "s.zarr")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_error_naming_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import zarr

    real = zarr.storage.LocalStore.set
    calls = []

    async def full_after_two(self, key, value):
        calls.append(key)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_after_two)
    out = tmp_path / "artifacts/prepare/disc"
    with pytest.raises(ResourceError) as err:
        with atomic_dir(out) as tmp:
            _small_store(tmp / "train.zarr")
    message = str(err.value)
    assert message.startswith(f"out of disk space writing {out} (No space left on device)")
    assert "up to 640 bytes uncompressed" in message and "free on its disk" in message
    assert list(tmp_path.iterdir()) == []


READ_DAMAGED = """
import sys
from pipeline.artifacts import open_store
from pipeline.errors import InputError
try:
    open_store(sys.argv[1])["x"][:]
except InputError as err:
    print("error:", str(err)[:60], file=sys.stderr)
    sys.exit(1)
"""


def test_a_failed_read_leaves_no_pending_zarr_task_behind(tmp_path):
    """zarr reads the chunks of one call concurrently and returns at the first failure; the
    tasks still pending were reported by asyncio at exit ("Task was destroyed but it is
    pending!") after the one-line error, every time with many damaged chunks."""
    import subprocess
    import sys

    path = tmp_path / "s.zarr"
    with StoreWriter(path, attrs={"stage": "infer"}, shard_bytes=4096) as w:
        w.write("x", np.random.default_rng(0).random((400, 16, 16)).astype(np.float32))
    for shard in (p for p in (path / "x/c").rglob("*") if p.is_file()):
        data = bytearray(shard.read_bytes())
        data[40] ^= 0xFF
        data[2000] ^= 0xFF
        shard.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", READ_DAMAGED, str(path)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.startswith("error: ")
        assert done.stderr.count("\n") == 1, done.stderr  # nothing after the error line
