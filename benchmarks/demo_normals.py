"""Mean angular error of the estimated normals on the demo test images (issue 17).

    .venv/bin/python benchmarks/demo_normals.py [--models demo:tiny-marigold-untrained
                                                 demo:tiny-marigold] [--data data/demo]

For each category of params.yaml's ``data.categories``, every test image of the demo dataset
(rendered into a temporary folder with ``write_demo_dataset(seed=0)``, or read from ``--data``)
is prepared as the prepare stage does (``preprocess``, ``real_normals`` with the ``data``
section), its normals are estimated as the estimate_normals stage does (``predict_normals``
with the ``estimate_normals`` section; ``input: prepared`` at ``data.size``) and compared with
the real normals on the object (the prepared foreground): the angle between the two unit
vectors, averaged over all object pixels of the category. Prints one line per model and
category and the mean over categories, and as a baseline the error of the constant normal
(0, 0, 1) (a surface facing the camera).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from pipeline.data.demo import write_demo_dataset
from pipeline.data.preprocess import PreprocessConfig, preprocess, real_normals
from pipeline.models.diffusion import load_marigold
from pipeline.normals import decode_normals
from pipeline.normals_estimation import MarigoldRun, image_seeds, predict_normals
from pipeline.params import load_params


def _test_samples(root: Path, category: str):
    for rgb_path in sorted((root / category / "test").glob("*/rgb/*.png")):
        kind_dir = rgb_path.parent.parent
        xyz = tifffile.imread(kind_dir / "xyz" / f"{rgb_path.stem}.tiff")
        rgb = np.asarray(Image.open(rgb_path).convert("RGB"))
        yield f"test/{kind_dir.name}/{rgb_path.stem}", rgb, xyz


def prepared_category(root: Path, category: str, params):
    cfg = PreprocessConfig.from_params(params.data, category)
    ids, rgbs, reals, fgs = [], [], [], []
    for sample_id, rgb, xyz in _test_samples(root, category):
        prep = preprocess(rgb, xyz, np.zeros(rgb.shape[:2], bool), cfg)
        ids.append(sample_id)
        rgbs.append(prep.rgb)
        reals.append(decode_normals(real_normals(xyz, prep, cfg)))
        fgs.append(prep.fg.astype(bool))
    return ids, np.stack(rgbs), np.stack(reals), np.stack(fgs)


def angular_error(est: np.ndarray, real: np.ndarray, mask: np.ndarray) -> float:
    """Mean angle in degrees between unit vectors (N, H, W, 3) over ``mask`` (N, H, W)."""
    e = est / np.linalg.norm(est, axis=-1, keepdims=True).clip(1e-6)
    r = real / np.linalg.norm(real, axis=-1, keepdims=True).clip(1e-6)
    cos = np.clip((e * r).sum(-1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos))[mask].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+",
                    default=["demo:tiny-marigold-untrained", "demo:tiny-marigold"])
    ap.add_argument("--data", type=Path, default=None, help="demo dataset (else rendered)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    p = params.estimate_normals
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = write_demo_dataset(Path(tmp) / "demo", seed=0, categories=params.data.categories,
                                      n_train=0, n_validation=0)
        data = {c: prepared_category(root, c, params) for c in params.data.categories}
        # Baseline: every pixel facing the camera, (0, 0, 1) in the real-normal frame.
        errors = []
        for category, (ids, rgb, real, fg) in data.items():
            facing = np.broadcast_to(np.float32([0, 0, 1]), real.shape)
            errors.append(angular_error(facing, real, fg))
            print(f"{'constant (0, 0, 1)':32s} {category:6s} {len(ids):3d} test images: mean "
                  f"angular error on the object {errors[-1]:5.1f} deg")
        print(f"{'constant (0, 0, 1)':32s} mean over categories: {np.mean(errors):5.1f} deg")
        for spec in args.models:
            pipe, _ = load_marigold(spec, Path(tmp) / "models", torch.device("cpu"), torch.float32)
            run = MarigoldRun(steps=p.steps, ensemble=p.ensemble,
                              processing_resolution=p.processing_resolution or 64,
                              reduction=p.reduction, seeding=p.seeding, output=p.output,
                              flip_x=p.flip_x)
            errors = []
            for category, (ids, rgb, real, fg) in data.items():
                start = time.perf_counter()
                est = [decode_normals(predict_normals(
                    pipe, rgb[i:i + p.batch_size],
                    image_seeds(p.seed, ids[i:i + p.batch_size], p.seeding),
                    run, params.data.size)) for i in range(0, len(ids), p.batch_size)]
                err = angular_error(np.concatenate(est), real, fg)
                errors.append(err)
                print(f"{spec:32s} {category:6s} {len(ids):3d} test images: mean angular error "
                      f"on the object {err:5.1f} deg ({time.perf_counter() - start:.1f} s)")
            print(f"{spec:32s} mean over categories: {np.mean(errors):5.1f} deg")


if __name__ == "__main__":
    main()
