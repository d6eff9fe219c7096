"""Speed of the data layer: demo generation, per-sample preprocessing and real normals.

Run: ``.venv/bin/python benchmarks/bench_prepare.py``. Prints wall-clock figures; the
preprocessing target is well under a second for a 400 x 400 sample.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ holds a pipeline.py of its own: keep it from shadowing the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402

os.environ.setdefault("CMDS_AD_QUIET", "1")

from pipeline.data.demo import Camera, render_sample, write_demo_dataset  # noqa: E402
from pipeline.data.preprocess import PreprocessConfig, clean_points, preprocess  # noqa: E402
from pipeline.normals import estimate_normals  # noqa: E402
from pipeline.params import parse_params  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    sample = render_sample("disc", Camera(400, 400, 1100.0), np.random.default_rng(0), "bump")
    cfg = PreprocessConfig()
    t_clean = best_of(lambda: clean_points(sample.xyz, cfg))
    t_prep = best_of(lambda: preprocess(sample.rgb, sample.xyz, sample.gt, cfg))
    prepared = preprocess(sample.rgb, sample.xyz, sample.gt, cfg)
    t_normals = best_of(lambda: estimate_normals(prepared.xyz))
    print(f"400x400 sample: plane removal + clustering {t_clean * 1000:.1f} ms")
    print(f"400x400 sample: preprocess steps 1-4 to 224 {t_prep * 1000:.1f} ms")
    print(f"224x224 real normals (windowed PCA)         {t_normals * 1000:.1f} ms")

    from pipeline.normals import estimate_normals_published, normal_image_published

    full = render_sample("disc", Camera(600, 800, 1800.0), np.random.default_rng(0), "bump")
    cleaned = clean_points(full.xyz, cfg)
    n_raw = int(np.any(full.xyz != 0, axis=-1).sum())
    n_obj = int(np.any(cleaned != 0, axis=-1).sum())
    t_raw = best_of(lambda: estimate_normals_published(full.xyz), 3)
    t_obj = best_of(lambda: estimate_normals_published(cleaned), 3)
    normals = estimate_normals_published(cleaned)
    t_img = best_of(lambda: normal_image_published(normals, 224), 3)
    print(f"800x600 published normals, whole cloud ({n_raw} points)  {t_raw * 1000:.0f} ms")
    print(f"800x600 published normals, after cleaning ({n_obj} points) {t_obj * 1000:.0f} ms")
    print(f"800x600 published normal image (uint8, pad, cubic to 224) {t_img * 1000:.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_demo_dataset(Path(tmp) / "demo")
        t_demo = time.perf_counter() - start
        files = sum(1 for p in (Path(tmp) / "demo").rglob("*") if p.is_file())
        print(f"demo dataset, 3 categories x 37 samples ({files} files): {t_demo:.2f} s")

        from stages import prepare

        params = parse_params(
            {"data": {"root": str(Path(tmp) / "demo"), "categories": ["disc"]}}
        )
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            start = time.perf_counter()
            prepare.run(params, "disc")
            t_stage = time.perf_counter() - start
        finally:
            os.chdir(cwd)
        print(f"prepare stage, disc (24 test + 4 shot samples at 224): {t_stage:.2f} s")


if __name__ == "__main__":
    main()
