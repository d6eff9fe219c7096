"""Feature extraction throughput: end to end (Zarr in -> encode -> Zarr out) vs bare forward.

For each backbone, builds synthetic 224 x 224 input stores (RGB, real and estimated normals) in
a temporary folder, then measures
- bare: the backbone's forward pass alone on the same batches (already in memory, three
  modalities per image, as the stage runs them), and
- end to end: ``pipeline.features.extract_store`` reading, encoding and writing the store,
and prints images per second and their ratio (target: end to end >= 85 % of bare), and
"busy": the share of the end-to-end wall time spent in forward passes, measured inside the
same run (so, unlike the ratio, it is not skewed by load that changes between runs).
Each figure is the best of ``--repeats`` runs, alternating the order (the machine is shared).

    .venv/bin/python benchmarks/features.py [--repeats 2] [--only efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# A sibling script named like a package (pipeline.py) must not shadow it: drop this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CMDS_AD_QUIET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.artifacts import StoreWriter, open_store  # noqa: E402
from pipeline.features import Source, encode, extract_store, to_input  # noqa: E402
from pipeline.models.backbones import load_backbone  # noqa: E402

SIZE = 224
# (label, models.backbone spec, layers, images, batch size): small enough for 2 CPU cores.
CASES = [
    ("efficientnet_lite0 (demo, pretrained)", "efficientnet_lite0", [2, 3, 4], 64, 16),
    ("ViT-S/8 (random init)", "random:vit_small_patch8_224", [4, 7, 11], 12, 4),
    ("ViT-B/8 (random init)", "random:vit_base_patch8_224", [4, 7, 11], 6, 2),
]


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Images with smooth structure plus noise, so compression sees realistic data."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = np.empty((n, SIZE, SIZE, 3), np.float32)
    for i in range(n):
        f = rng.uniform(1, 6, size=3)
        for c in range(3):
            out[i, ..., c] = 0.5 + 0.4 * np.sin(2 * np.pi * (f[c] * xx + rng.uniform() + f[(c + 1) % 3] * yy))
    return np.clip(out + rng.normal(0, 0.02, out.shape), 0, 1)


def make_inputs(root: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    ids = [f"good/{i:03d}" for i in range(n)]
    prep, est = root / "prepare.zarr", root / "normals.zarr"
    with StoreWriter(prep, attrs={"ids": ids, "labels": [0] * n}) as w:
        w.write("rgb", (smooth_images(rng, n) * 255).astype(np.uint8))
        w.write("normals", smooth_images(rng, n).astype(np.float16))
    with StoreWriter(est, attrs={"ids": ids}) as w:
        w.write("normals", smooth_images(rng, n).astype(np.float16))
    return prep, est


def sources(prep: Path, est: Path) -> list[Source]:
    p, e = open_store(prep), open_store(est)
    return [Source("rgb", p, "rgb", "rgb"), Source("real", p, "normals", "normals"), Source("est", e, "normals", "normals")]


def bare_rate(backbone, srcs: list[Source], n: int, batch: int) -> float:
    batches = [
        [(to_input(s.store[s.array][a : a + batch], s.kind, "bench"), s.kind) for s in srcs]
        for a in range(0, n, batch)
    ]
    with torch.inference_mode():
        start = time.perf_counter()
        for group in batches:
            for x, kind in group:
                encode(backbone, x, kind)
        return n / (time.perf_counter() - start)


def end_to_end_rate(backbone, srcs: list[Source], n: int, batch: int, out: Path) -> tuple[float, float]:
    """Images per second, and the share of the wall time spent in the forward passes."""
    stats: dict[str, float] = {}
    start = time.perf_counter()
    extract_store(backbone, srcs, out, {"ids": list(srcs[0].store.attrs["ids"])}, batch_size=batch, stats=stats)
    wall = time.perf_counter() - start
    return n / wall, stats["encode_s"] / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only cases whose spec contains this")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {SIZE}x{SIZE}, "
          f"best of {args.repeats}")
    print(f"{'backbone':40s} {'images':>6s} {'batch':>5s} {'bare img/s':>10s} {'e2e img/s':>10s} "
          f"{'ratio':>6s} {'busy':>6s}")
    for label, spec, layers, n, batch in CASES:
        if args.only and args.only not in spec:
            continue
        backbone = load_backbone(spec, layers)
        with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
            root = Path(tmp)
            prep, est = make_inputs(root, n)
            srcs = sources(prep, est)
            encode(backbone, torch.zeros(1, 3, SIZE, SIZE), "rgb")  # warm-up
            bare, e2e, busy = 0.0, 0.0, 0.0
            for r in range(args.repeats):
                # Alternate the order so a burst of load elsewhere does not favour one side.
                runs = ["bare", "e2e"] if r % 2 == 0 else ["e2e", "bare"]
                for run in runs:
                    if run == "bare":
                        bare = max(bare, bare_rate(backbone, srcs, n, batch))
                    else:
                        rate, share = end_to_end_rate(backbone, srcs, n, batch, root / f"out{r}.zarr")
                        if rate > e2e:
                            e2e, busy = rate, share
        print(f"{label:40s} {n:6d} {batch:5d} {bare:10.2f} {e2e:10.2f} {e2e / bare:6.1%} {busy:6.1%}",
              flush=True)


if __name__ == "__main__":
    main()
