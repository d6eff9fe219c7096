"""Zarr v3 artifact stores (DESIGN 2.2).

One store (a directory) per stage output and key. Arrays are zstd-compressed and sharded
along the sample axis so a store is a handful of files; samples are appended in order and
buffered until a shard is full, so a writer holds at most one shard per array in memory.
Attributes carry provenance and never timestamps or host names, so identical inputs give
byte-identical stores. Stores are built in a temporary sibling and renamed into place only
when complete: an interrupted write leaves nothing that looks finished. Every writer first
claims its output (:mod:`pipeline.outputs`: one writer at a time, only dead writers'
temporaries removed, the temporary checked before the rename).

Integrity: every chunk carries a crc32c checksum (zarr's codec; shard indexes have one by
default), every shard is written even when all its values are the fill value, and the group
records its array names. So a reader can tell a deleted or truncated shard, a flipped byte or a
missing array from valid data; :class:`Store` checks presence when it opens a store and turns any
read failure into one :class:`InputError` naming the store, the array, the samples and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from pipeline import __version__
from pipeline.errors import InputError, OutputError
from pipeline.outputs import Claim, is_disk_full, umask

if TYPE_CHECKING:
    import zarr
# zarr is imported where a store is written or opened: the atomic file writers here also serve
# validate_params and demo_data, which pay no zarr start-up (benchmarks/imports.py)

SHARD_BYTES = 32 * 2**20  # target uncompressed size of one shard
ZSTD_LEVEL = 3
ARRAYS_ATTR = "_arrays"  # the array names a writer created, checked by Store (hidden from attrs)
# Write every shard, even one that is all fill value: a missing shard file is then damage,
# never "empty" (zarr would otherwise read it back as zeros without a word).
_ARRAY_CONFIG = {"write_empty_chunks": True}


def provenance(stage: str, params: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Standard provenance attributes: stage, parameter values, package version, extras."""
    return {"stage": stage, "params": dict(params), "package_version": __version__, **extra}


def _public_tree(root: Path) -> None:
    """Umask modes for everything inside a finished output folder: some writers (safetensors'
    save_file, anything using mkstemp) create private 0600 files whatever the umask."""
    mask = umask()
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _give_up(claim: Claim, err: BaseException) -> None:
    """Discard a claim after a failure. Running out of disk becomes one ResourceError; an I/O
    error because another process removed the temporary (a write of zarr's own into it, say)
    becomes the OutputError that says so, as when the removal is found before the rename."""
    if is_disk_full(err) and claim.outermost() is claim:
        message = claim.disk_full(err)  # type: ignore[arg-type]
        claim.discard()
        raise message from None
    if isinstance(err, OSError):
        try:
            claim.verify()
        except OutputError as removed:
            claim.discard()
            raise removed from None
    claim.discard()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    The caller holds ``path`` for the block: a second writer of it fails at once
    (:mod:`pipeline.outputs`)."""
    claim = Claim(Path(path), directory=True).open()
    try:
        yield claim.tmp
        _public_tree(claim.tmp)
    except BaseException as err:
        _give_up(claim, err)
        raise
    claim.commit()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    claim = Claim(Path(path), directory=False).open()
    try:
        assert claim.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(claim.fd, view):]
    except BaseException as err:
        _give_up(claim, err)
        raise
    claim.commit()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, missing: str) -> Any:
    """The JSON value of a file the user or an earlier stage wrote. A missing file is an
    InputError saying ``missing`` (what makes the file); an unreadable one says why."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: JSON and UTF-8 decoding errors
        raise InputError(f"{path}: not valid JSON ({err})") from None


def _samples_per_shard(
    sample_shape: tuple[int, ...], dtype: np.dtype, n: int, shard_bytes: int
) -> int:
    sample_bytes = max(1, int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return int(max(1, min(n, shard_bytes // sample_bytes)))


class _ArrayAppender:
    """Appends samples along axis 0, writing whole shards at once."""

    def __init__(self, array: zarr.Array, shard_len: int) -> None:
        self.array = array
        self.shard_len = shard_len
        self.buffer: list[np.ndarray] = []
        self.written = 0

    def append(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=self.array.dtype)
        if batch.shape[1:] != self.array.shape[1:]:
            raise ValueError(
                f"array {self.array.name!r}: sample shape {batch.shape[1:]} "
                f"does not match {self.array.shape[1:]}"
            )
        self.buffer.extend(batch)
        pending = self.written + len(self.buffer)
        if pending > self.array.shape[0]:
            raise ValueError(f"array {self.array.name!r}: more than {self.array.shape[0]} samples")
        while len(self.buffer) >= self.shard_len:
            self._flush(self.shard_len)

    def _flush(self, count: int) -> None:
        block = np.stack(self.buffer[:count])
        self.array[self.written : self.written + count] = block
        del self.buffer[:count]
        self.written += count

    def close(self) -> None:
        if self.buffer:
            self._flush(len(self.buffer))
        if self.written != self.array.shape[0]:
            raise ValueError(
                f"array {self.array.name!r}: {self.written} samples written, "
                f"{self.array.shape[0]} declared"
            )


class StoreWriter:
    """Build a Zarr v3 store atomically.

    >>> with StoreWriter("out.zarr", attrs={...}) as w:
    ...     w.create("rgb", n=10, sample_shape=(224, 224, 3), dtype="uint8")
    ...     for batch in batches:
    ...         w.append("rgb", batch)
    """

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, Any] | None = None,
        shard_bytes: int | None = None,
    ) -> None:
        """``shard_bytes`` bounds the writer's buffer per array (default ``SHARD_BYTES``);
        smaller shards mean flatter memory but more files."""
        self.path = Path(path)
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self.attrs = dict(attrs or {})
        self._arrays: dict[str, _ArrayAppender] = {}
        self._claim: Claim | None = None
        self._group: zarr.Group | None = None

    def __enter__(self) -> StoreWriter:
        self._claim = Claim(self.path, directory=True).open()
        try:
            import zarr

            self._group = zarr.open_group(zarr.storage.LocalStore(self._claim.tmp), mode="w-",
                                          zarr_format=3)
        except BaseException as err:
            _give_up(self._claim, err)
            raise
        return self

    def create(self, name: str, n: int, sample_shape: tuple[int, ...], dtype: Any) -> None:
        from zarr.codecs import Crc32cCodec, ZstdCodec

        assert self._group is not None, "use StoreWriter as a context manager"
        dtype = np.dtype(dtype)
        shard_len = _samples_per_shard(sample_shape, dtype, max(n, 1), self.shard_bytes)
        array = self._group.create_array(
            name,
            shape=(n, *sample_shape),
            dtype=dtype,
            chunks=(1, *sample_shape),
            shards=(shard_len, *sample_shape),
            compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()],
            fill_value=0,
            config=_ARRAY_CONFIG,
        )
        self._arrays[name] = _ArrayAppender(array, shard_len)
        assert self._claim is not None
        self._claim.expect(int(np.prod((n, *sample_shape), dtype=np.int64)) * dtype.itemsize)

    def append(self, name: str, batch: np.ndarray) -> None:
        self._arrays[name].append(batch)

    def write(self, name: str, data: np.ndarray) -> None:
        """Create and fill an array in one call (small arrays)."""
        data = np.asarray(data)
        self.create(name, len(data), data.shape[1:], data.dtype)
        self.append(name, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._claim is not None and self._group is not None
        if exc_type is not None:
            settle_pending_io()
            _give_up(self._claim, exc)
            return
        try:
            for appender in self._arrays.values():
                appender.close()
            attrs = {**_jsonable(self.attrs), ARRAYS_ATTR: sorted(self._arrays)}
            self._group.attrs.update(attrs)
            self._claim.verify()
            _check_written(self._claim)
        except BaseException as err:
            settle_pending_io()
            _give_up(self._claim, err)
            raise
        self._claim.commit()


def _check_written(claim: Claim) -> None:
    """What a writer made is complete: every array it created, every shard file (the checks a
    reader makes when it opens the store)."""
    try:
        Store(claim.tmp)
    except InputError as err:
        root = claim.outermost()  # the output the user asked for
        where = "" if root is claim else f" in {claim.path.relative_to(root.tmp)}"
        reason = str(err).removeprefix(f"{claim.tmp}: ").split("; re-run", 1)[0]
        raise OutputError(f"{root.path}: what was written{where} was removed by another process "
                          f"while this one wrote it ({reason}); nothing was written, run "
                          "again") from None


def settle_pending_io(timeout: float = 30.0) -> None:
    """Let zarr's in-flight reads and writes finish and collect their errors.

    zarr runs the chunks of one call as concurrent tasks on its own event loop and returns at
    the first failure; the others run on and, at exit, asyncio would print "Task was destroyed
    but it is pending" or "Task exception was never retrieved" after our one-line error.
    """
    import asyncio

    from zarr.core import sync

    loop = sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: asyncio no longer reports it

    try:
        sync.sync(drain(), timeout=timeout + 5)
    except Exception:  # the error being reported matters more than the drain
        pass


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so numpy scalars and tuples become plain values."""
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_FIX = ("re-run the stage that writes it (`dvc repro --force` on that stage) or restore the "
        "cached copy with `dvc checkout --force`")


class StoredArray:
    """A read-only array of a :class:`Store`: a failed read names the store, array and samples.

    Everything but indexing is the zarr array's (shape, dtype, shards, ...).
    """

    def __init__(self, store: Store, name: str, array: zarr.Array) -> None:
        self._store = store
        self._name = name
        self._array = array

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._array, attr)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return self._array.ndim

    def __len__(self) -> int:
        return self._array.shape[0]

    def __getitem__(self, key: Any) -> Any:
        try:
            return self._array[key]
        except Exception as err:  # decode, checksum or I/O failure inside zarr
            settle_pending_io()
            rows = self._narrow(_rows(key, self.shape[0]))
            settle_pending_io()
            raise self._store.damaged(self._name, err, rows) from None

    def _narrow(self, rows: list[int] | None) -> list[int] | None:
        """The samples of the first shard among ``rows`` that fails to read (error path only)."""
        if not rows or self.shards is None:
            return rows
        per = self.shards[0]
        for first in sorted({r // per * per for r in rows}):
            try:
                self._array[first:min(first + per, self.shape[0])]
            except Exception:
                return [r for r in rows if first <= r < first + per]
        return rows

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[...], dtype=dtype)


def _rows(key: Any, n: int) -> list[int] | None:
    """The sample indices (axis 0) an index expression reads, where simple to tell."""
    first = key[0] if isinstance(key, tuple) and key else key
    if first is Ellipsis or (isinstance(key, tuple) and not key):
        return list(range(n))
    if isinstance(first, slice):
        return list(range(*first.indices(n)))
    if isinstance(first, (int, np.integer)):
        return [int(first) % n] if n else None
    try:
        return [int(i) for i in np.asarray(first).ravel()]
    except (TypeError, ValueError):
        return None


class Store:
    """A read-only, lazy view of a finished store: arrays are read one slice at a time.

    Opening checks what is cheap to check (the metadata parses, every array the writer recorded
    is there, every shard file exists and holds at least its index); reading checks each chunk's
    checksum. Any failure is one :class:`InputError` (see :meth:`damaged`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise InputError(
                f"{self.path}: artifact store not found or incomplete "
                "(run the stage that produces it, e.g. `dvc repro`)"
            )
        import zarr

        try:
            self.group = zarr.open_group(
                zarr.storage.LocalStore(self.path, read_only=True), mode="r", zarr_format=3
            )
            attrs = dict(self.group.attrs)
        except Exception as err:  # zarr raises many types for a damaged store
            settle_pending_io()
            raise self.damaged(None, err) from None
        recorded = attrs.pop(ARRAYS_ATTR, None)
        self.attrs: dict[str, Any] = attrs
        self._arrays: dict[str, zarr.Array] = {}
        try:
            with warnings.catch_warnings():  # a folder without zarr.json: reported below, once
                warnings.simplefilter("ignore")
                for name, array in self.group.arrays():
                    self._arrays[name] = array  # type: ignore[assignment]
        except Exception as err:  # an array's zarr.json that does not parse
            settle_pending_io()
            raise self.damaged(None, err) from None
        for name in recorded or ():
            if name not in self._arrays:
                raise self.damaged(name, f"{self.path / name / 'zarr.json'} is missing")
        for name, array in self._arrays.items():
            self._check_shards(name, array)

    def damaged(self, name: str | None, err: Exception | str,
                rows: list[int] | None = None) -> InputError:
        """The one error for a store that cannot be read: store, array, samples and the fix."""
        what = f"{self.path}" if name is None else f"{self.path}: array {name!r}"
        reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        samples = ""
        if rows:
            ids = self.attrs.get("ids") if hasattr(self, "attrs") else None
            named = [str(ids[i]) if isinstance(ids, list) and 0 <= i < len(ids) else str(i)
                     for i in rows[:3]]
            more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
            samples = f" (samples {', '.join(named)}{more})"
        stage = getattr(self, "attrs", {}).get("stage")
        fix = _FIX.replace("the stage", f"the `{stage}` stage") if stage else _FIX
        return InputError(f"{what} is damaged or incomplete{samples}: {reason}; {fix}")

    def _check_shards(self, name: str, array: zarr.Array) -> None:
        """Every shard file must exist and be at least as long as its index."""
        shards = array.shards or array.chunks
        grid = [-(-n // s) for n, s in zip(array.shape, shards)]
        per_shard = int(np.prod([s // c for s, c in zip(shards, array.chunks)], dtype=np.int64))
        index_bytes = 16 * per_shard + 4 if array.shards else 1
        for coords in np.ndindex(*grid):
            key = array.metadata.encode_chunk_key(coords)
            file = self.path / name / key
            try:
                size = file.stat().st_size
            except OSError:
                size = -1
            if size < index_bytes:
                first = coords[0] * shards[0] if coords else 0
                rows = list(range(first, min(first + shards[0], array.shape[0]))) if coords else None
                problem = "missing" if size < 0 else f"truncated ({size} bytes)"
                raise self.damaged(name, f"shard file {file} is {problem}", rows)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def __getitem__(self, name: str) -> StoredArray:
        if name not in self._arrays:
            raise InputError(
                f"{self.path}: no array {name!r} (has: {', '.join(sorted(self.names()))})"
            )
        return StoredArray(self, name, self._arrays[name])

    def names(self) -> list[str]:
        return list(self._arrays)

    @property
    def ids(self) -> list[str]:
        """The sample ids (attribute ``ids``): one per row of every per-sample array."""
        ids = self.attrs.get("ids")
        if not isinstance(ids, list):
            raise InputError(f"{self.path}: attribute 'ids' (the sample ids) is missing; "
                             "re-run the stage that writes this store")
        return [str(i) for i in ids]

    def __len__(self) -> int:
        ids = self.attrs.get("ids")
        if ids is not None:
            return len(ids)
        names = self.names()
        return self[names[0]].shape[0] if names else 0

    def iter_batches(self, names: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield consecutive batches of the named arrays, reading only one batch at a time."""
        n = len(self)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            yield {name: self[name][start:stop] for name in names}


def open_store(path: str | Path) -> Store:
    return Store(path)


def require_same_ids(path: Path | str, ids: list[str], other_path: Path | str,
                     other_ids: list[str]) -> None:
    """Two stores must describe the same samples in the same order; else name both and where."""
    if ids == other_ids:
        return
    diff = next((i for i, (a, b) in enumerate(zip(ids, other_ids)) if a != b),
                min(len(ids), len(other_ids)))
    raise InputError(
        f"{path}: sample ids do not match {other_path} ({len(ids)} vs {len(other_ids)} "
        f"samples; first difference at position {diff}: "
        f"{ids[diff] if diff < len(ids) else None!r} vs "
        f"{other_ids[diff] if diff < len(other_ids) else None!r})"
    )


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, for provenance of weight files."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
