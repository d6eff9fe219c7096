"""Zarr v3 artifact stores (DESIGN 2.2).

One store (a directory) per stage output and key. Arrays are zstd-compressed and sharded
along the sample axis so a store is a handful of files; samples are appended in order and
buffered until a shard is full, so a writer holds at most one shard per array in memory.
Attributes carry provenance and never timestamps or host names, so identical inputs give
byte-identical stores. Stores are built in a temporary sibling and renamed into place only
when complete: an interrupted write leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline import __version__
from pipeline.errors import InputError

SHARD_BYTES = 32 * 2**20  # target uncompressed size of one shard
ZSTD_LEVEL = 3


def provenance(stage: str, params: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Standard provenance attributes: stage, parameter values, package version, extras."""
    return {"stage": stage, "params": dict(params), "package_version": __version__, **extra}


def _temp_sibling(path: Path) -> Path:
    """A fresh temporary directory beside ``path``; leftovers of killed runs are removed.

    Only one writer per output exists at a time (DVC locks the repository), so any older
    ``.<name>.tmp-*`` sibling belongs to a run that died.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _replace(tmp: Path, path: Path) -> None:
    """Move a finished temporary sibling into place, replacing what was there."""
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
        self._tmp: Path | None = None
        self._group: zarr.Group | None = None

    def __enter__(self) -> StoreWriter:
        self._tmp = _temp_sibling(self.path)
        self._group = zarr.open_group(zarr.storage.LocalStore(self._tmp), mode="w", zarr_format=3)
        return self

    def create(self, name: str, n: int, sample_shape: tuple[int, ...], dtype: Any) -> None:
        assert self._group is not None, "use StoreWriter as a context manager"
        dtype = np.dtype(dtype)
        shard_len = _samples_per_shard(sample_shape, dtype, max(n, 1), self.shard_bytes)
        array = self._group.create_array(
            name,
            shape=(n, *sample_shape),
            dtype=dtype,
            chunks=(1, *sample_shape),
            shards=(shard_len, *sample_shape),
            compressors=ZstdCodec(level=ZSTD_LEVEL),
            fill_value=0,
        )
        self._arrays[name] = _ArrayAppender(array, shard_len)

    def append(self, name: str, batch: np.ndarray) -> None:
        self._arrays[name].append(batch)

    def write(self, name: str, data: np.ndarray) -> None:
        """Create and fill an array in one call (small arrays)."""
        data = np.asarray(data)
        self.create(name, len(data), data.shape[1:], data.dtype)
        self.append(name, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None and self._group is not None
        if exc_type is None:
            try:
                for appender in self._arrays.values():
                    appender.close()
                self._group.attrs.update(_jsonable(self.attrs))
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                raise
            _replace(self._tmp, self.path)
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)


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


class Store:
    """A read-only, lazy view of a finished store: arrays are read one slice at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise InputError(
                f"{self.path}: artifact store not found or incomplete "
                "(run the stage that produces it, e.g. `dvc repro`)"
            )
        try:
            self.group = zarr.open_group(
                zarr.storage.LocalStore(self.path, read_only=True), mode="r", zarr_format=3
            )
        except Exception as err:  # zarr raises many types for a damaged store
            raise InputError(f"{self.path}: cannot open artifact store: {err}") from None
        self.attrs: dict[str, Any] = dict(self.group.attrs)

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getitem__(self, name: str) -> zarr.Array:
        if name not in self.group:
            raise InputError(
                f"{self.path}: no array {name!r} (has: {', '.join(sorted(self.names()))})"
            )
        return self.group[name]  # type: ignore[return-value]

    def names(self) -> list[str]:
        return [name for name, _ in self.group.arrays()]

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
