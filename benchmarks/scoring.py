"""Peak memory and speed of the ``infer`` and ``score`` stages versus the number of test images.

For each test-set size, the parent builds a synthetic project (demo-size features: EfficientNet-
Lite0 layers 40/112/320 channels on a 28 x 28 grid, S = 224, random CAHFM mappers) in a temporary
folder, then runs ``stages.infer.run`` and then ``stages.score.run``, each in a fresh subprocess,
and reads that process's peak RSS (``VmHWM`` of /proc/self/status; not ``ru_maxrss``, which
Linux carries over from the parent's memory image across fork + exec). Both stream
one batch at a time, so the peak should not grow with the number of images (the stores are
written with 4 MiB shards, so the writer buffers at most one small shard per array). The score
child also reports whether torch was imported (it must not be: re-scoring stays cheap). Each
size runs once per stored map precision (``infer.map_dtype``, ``--map-dtypes``), with the
size of the stream-map store on disk.

    .venv/bin/python benchmarks/scoring.py [--sizes 50 200] [--threads 1] [--map-dtypes float16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Import the project from the repository root, not from benchmarks/ (first on sys.path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

CATEGORY = "bagel"


def _params(size: int, batch_size: int, map_dtype: str = "float32"):
    from pipeline.params import parse_params

    return parse_params({"data": {"categories": [CATEGORY], "size": size},
                         "infer": {"batch_size": batch_size, "map_dtype": map_dtype},
                         "score": {"batch_size": batch_size}})


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_project(root: Path, n: int, channels: list[int], grid: int, size: int,
                  resolution: int, architecture: str) -> None:
    import torch
    from safetensors.torch import save_file

    from pipeline.artifacts import StoreWriter, atomic_dir, atomic_write_json
    from pipeline.models.mapper import build_mapper
    from stages import layout

    os.chdir(root)
    rng = np.random.default_rng(0)
    ids = [f"{'crack' if i % 2 else 'good'}/{i:03d}" for i in range(n)]
    labels = [i % 2 for i in range(n)]
    attrs = {"ids": ids, "backbone": "efficientnet_lite0", "grid": [grid, grid],
             "channels": channels, "layers": [2, 3, 4]}
    with StoreWriter(layout.features(CATEGORY) / "test.zarr", attrs=attrs) as w:
        for m in ("rgb", "real", "est"):
            for layer, c in enumerate(channels):
                w.create(f"{m}_{layer}", n, (c, grid, grid), np.float16)
        for start in range(0, n, 25):
            b = min(25, n - start)
            for m in ("rgb", "real", "est"):
                for layer, c in enumerate(channels):
                    # Coarsely quantised so the store compresses and builds quickly.
                    x = np.round(rng.normal(size=(b, c, grid, grid)) * 4) / 4
                    w.append(f"{m}_{layer}", x.astype(np.float16))
    fg = np.zeros((n, size, size), np.uint8)
    fg[:, size // 8: -size // 8, size // 8: -size // 8] = 1
    with StoreWriter(layout.prepared(CATEGORY) / "test.zarr",
                     attrs={"ids": ids, "labels": labels, "category": CATEGORY}) as w:
        w.write("fg", fg)
    torch.manual_seed(0)
    mappers = {}
    with atomic_dir(layout.mappers(CATEGORY, 1, 0)) as tmp:
        for name in ("real_2d_to_3d", "real_3d_to_2d", "est_2d_to_3d", "est_3d_to_2d"):
            model = build_mapper(architecture, channels, channels).eval()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / f"{name}.safetensors"))
            mappers[name] = {"file": f"{name}.safetensors", "in_channels": channels,
                             "out_channels": channels, "width": model.width}
        atomic_write_json(tmp / "config.json", {
            "architecture": architecture, "resolution": resolution, "grid": [grid, grid],
            "backbone": "efficientnet_lite0", "layers": [2, 3, 4], "channels": channels,
            "mappers": mappers})


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """High-water RSS of this process's own address space (reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(root: Path, stage_name: str, size: int, batch_size: int, threads: int,
          map_dtype: str) -> None:
    import importlib

    if stage_name == "infer":
        import torch

        torch.set_num_threads(threads)
    # imports before the baseline reading
    stage = importlib.import_module(f"stages.{stage_name}")

    os.chdir(root)
    params = _params(size, batch_size, map_dtype)
    baseline = _rss_mib()
    t0 = time.perf_counter()
    stage.run(params, CATEGORY, 1, 0)
    wall = time.perf_counter() - t0
    peak = _peak_rss_mib()
    from stages import layout

    print(json.dumps({"wall_s": wall, "peak_rss_mib": peak, "baseline_rss_mib": baseline,
                      "torch_imported": "torch" in sys.modules,
                      "streams_bytes": _tree_bytes(layout.streams(CATEGORY, 1, 0))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--channels", type=int, nargs=3, default=[40, 112, 320])
    ap.add_argument("--grid", type=int, default=28)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--architecture", default="cahfm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--map-dtypes", nargs="+", default=["float32", "float16"],
                    choices=["float32", "float16"])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stage", default="score", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.stage, args.size, args.batch_size, args.threads,
              args.map_dtypes[0])
        return

    print(f"infer + score stages: {args.architecture} mappers, channels {args.channels}, grid {args.grid}, "
          f"resolution {args.resolution}, S={args.size}, batch {args.batch_size}, "
          f"{args.threads} thread(s)")
    print(f"{'stage':>6} {'maps':>7} {'images':>7} {'wall s':>8} {'s/image':>8} "
          f"{'peak RSS MiB':>13} {'peak - baseline MiB':>20} {'torch imported':>15} "
          f"{'streams MiB':>12}")
    env = {**os.environ, "CMDS_AD_QUIET": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
            here = Path.cwd()
            build_project(Path(tmp), n, args.channels, args.grid, args.size, args.resolution,
                          args.architecture)
            os.chdir(here)
            for dtype in args.map_dtypes:
                for stage_name in ("infer", "score"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", tmp, "--stage", stage_name,
                         "--size", str(args.size), "--batch-size", str(args.batch_size),
                         "--threads", str(args.threads), "--map-dtypes", dtype],
                        env=env, check=True, capture_output=True, text=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"{stage_name:>6} {dtype:>7} {n:>7} {r['wall_s']:>8.1f} "
                          f"{r['wall_s'] / n:>8.3f} {r['peak_rss_mib']:>13.0f} "
                          f"{r['peak_rss_mib'] - r['baseline_rss_mib']:>20.0f} "
                          f"{'yes' if r['torch_imported'] else 'no':>15} "
                          f"{r['streams_bytes'] / 2**20:>12.2f}")


if __name__ == "__main__":
    main()
