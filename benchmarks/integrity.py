"""Cost of the store integrity checks: crc32c per chunk, every shard written, checks at open.

Writes the same synthetic feature store (float16, demo-like layers) twice in a temporary
folder: once as the project writes it (zstd + crc32c, empty chunks written, shard files checked
when opened, reads through ``Store``), once as before (zstd only, read with zarr directly), and
times opening, reading every sample in batches, and writing. Repeats and reports the median.

    python benchmarks/integrity.py [--n 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Import the project from the repository root, not from benchmarks/ (first on sys.path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

LAYERS = {"rgb_0": (40, 28, 28), "rgb_1": (112, 28, 28), "rgb_2": (320, 28, 28)}
BATCH = 16


def _data(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((n, *shape)).astype(np.float16)
            for name, shape in LAYERS.items()}


def write_checked(path: Path, data: dict[str, np.ndarray]) -> float:
    from pipeline.artifacts import StoreWriter

    start = time.perf_counter()
    with StoreWriter(path, attrs={"ids": [str(i) for i in range(len(data["rgb_0"]))]},
                     shard_bytes=4 * 2**20) as w:
        for name, array in data.items():
            w.write(name, array)
    return time.perf_counter() - start


def write_plain(path: Path, data: dict[str, np.ndarray]) -> float:
    """The same layout without the checksum codec and with zarr's default empty-chunk rule."""
    import zarr
    from zarr.codecs import ZstdCodec

    from pipeline.artifacts import ZSTD_LEVEL, _samples_per_shard

    start = time.perf_counter()
    group = zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3)
    for name, array in data.items():
        shard = _samples_per_shard(array.shape[1:], array.dtype, len(array), 4 * 2**20)
        out = group.create_array(name, shape=array.shape, dtype=array.dtype,
                                 chunks=(1, *array.shape[1:]), shards=(shard, *array.shape[1:]),
                                 compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0)
        for first in range(0, len(array), shard):
            out[first:first + shard] = array[first:first + shard]
    return time.perf_counter() - start


def read_checked(path: Path) -> tuple[float, float]:
    from pipeline.artifacts import open_store

    start = time.perf_counter()
    store = open_store(path)
    opened = time.perf_counter()
    for batch in store.iter_batches(list(LAYERS), BATCH):
        assert batch["rgb_0"].dtype == np.float16
    return opened - start, time.perf_counter() - opened


def read_plain(path: Path) -> tuple[float, float]:
    import zarr

    start = time.perf_counter()
    group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
    arrays = {name: group[name] for name in LAYERS}
    opened = time.perf_counter()
    n = arrays["rgb_0"].shape[0]
    for first in range(0, n, BATCH):
        batch = {name: a[first:first + BATCH] for name, a in arrays.items()}
        assert batch["rgb_0"].dtype == np.float16
    return opened - start, time.perf_counter() - opened


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _crc_seconds(path: Path) -> float:
    """The checksum's own cost: crc32c over every stored byte once (google-crc32c, as zarr)."""
    import google_crc32c

    blobs = [f.read_bytes() for f in path.rglob("*") if f.is_file()]
    start = time.perf_counter()
    for blob in blobs:
        google_crc32c.value(blob)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="samples in the store")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = _data(args.n)
    mib = sum(a.nbytes for a in data.values()) / 2**20
    times: dict[str, list[float]] = {k: [] for k in
                                     ("write_plain", "write_checked", "open_plain", "open_checked",
                                      "read_plain", "read_checked")}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            plain, checked = Path(tmp) / f"plain{i}.zarr", Path(tmp) / f"checked{i}.zarr"
            # alternate the order so that cache warm-up does not favour one of them
            for kind in (("plain", "checked") if i % 2 == 0 else ("checked", "plain")):
                if kind == "plain":
                    times["write_plain"].append(write_plain(plain, data))
                    o, r = read_plain(plain)
                else:
                    times["write_checked"].append(write_checked(checked, data))
                    o, r = read_checked(checked)
                times[f"open_{kind}"].append(o)
                times[f"read_{kind}"].append(r)
        sizes = _size(Path(tmp) / "plain0.zarr"), _size(Path(tmp) / "checked0.zarr")
        crc = _crc_seconds(Path(tmp) / "checked0.zarr")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"store: {args.n} samples, 3 float16 layers, {mib:.1f} MiB raw, "
          f"median of {args.repeats}")
    print(f"on disk:       plain {sizes[0] / 2**20:7.2f} MiB   checked {sizes[1] / 2**20:7.2f} MiB"
          f"   (+{100 * (sizes[1] - sizes[0]) / sizes[0]:.2f} %)")
    print(f"crc32c alone:  {1000 * crc:8.1f} ms over all stored bytes "
          f"({sizes[1] / 2**20 / crc:.0f} MiB/s)")
    for what in ("write", "open", "read"):
        p, c = med[f"{what}_plain"], med[f"{what}_checked"]
        print(f"{what:5s}:        plain {1000 * p:8.1f} ms  checked {1000 * c:8.1f} ms"
              f"   ({100 * (c - p) / p:+.1f} %)")
    total_p = med["open_plain"] + med["read_plain"]
    total_c = med["open_checked"] + med["read_checked"]
    print(f"open + read:   plain {1000 * total_p:8.1f} ms  checked {1000 * total_c:8.1f} ms"
          f"   ({100 * (total_c - total_p) / total_p:+.1f} %)")


if __name__ == "__main__":
    main()
