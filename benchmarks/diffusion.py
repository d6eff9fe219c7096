"""Benchmark of the diffusion stages on the demo preset (CPU): LoRA steps, img2img images,
Marigold images, and the share of stage time spent outside model calls.

    .venv/bin/python benchmarks/diffusion.py [--shots 2] [--test-images 24]

Runs the real stages (``stages.augment``, ``stages.estimate_normals``) with the ``augment``,
``estimate_normals`` and ``models`` values of params.yaml on synthetic 224 x 224 prepare
stores in a temporary folder. "Outside model calls" is stage wall time minus time inside
UNet/VAE/text-encoder calls (measured around each pipeline or training-step call); it is given
with and without the one-off model loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CMDS_AD_QUIET", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.artifacts import StoreWriter  # noqa: E402
from pipeline.device import pick_device  # noqa: E402
from pipeline.params import parse_params  # noqa: E402
from stages import augment, estimate_normals, layout  # noqa: E402


def synthetic_prepare(size: int, n_train: int, n_test: int, shots: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("train", n_train), ("test", n_test)):
        ids = [f"good/{i:03d}" for i in range(n)]
        base = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 200
        rgb = np.stack([base + rng.normal(0, 10, base.shape) for _ in range(n)])
        with StoreWriter(layout.prepared("bench") / f"{split}.zarr", attrs={"ids": ids}) as w:
            w.write("rgb", np.clip(rgb, 0, 255).astype(np.uint8))
    shots_ids = [f"good/{i:03d}" for i in range(shots)]
    (layout.prepared("bench") / "shots.json").write_text(json.dumps({f"k{shots}-s0": shots_ids}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=24)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args()

    raw = yaml.safe_load(args.params.read_text())
    cache = (REPO / raw["models"]["cache_dir"]).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as tmp:
        os.chdir(tmp)
        Path("data/bench").mkdir(parents=True)
        raw["data"].update(root="data", categories=["bench"])
        raw["models"]["cache_dir"] = str(cache)
        raw["fewshot"]["shots"] = [args.shots]
        raw["fit_mapper"]["steps"] = {args.shots: 1}
        params = parse_params(raw)
        size = params.data.size
        synthetic_prepare(size, args.shots, args.test_images, args.shots)
        # Warm-up: build the demo models once (a one-off cost, not part of a stage run).
        estimate_normals.run(params, "bench")
        aug = augment.run(params, "bench", args.shots, 0)
        real = estimate_normals.run(params, "bench")
        gen = estimate_normals.run(params, "bench", args.shots, 0)

    a, e = params.augment, params.estimate_normals
    print(f"device: {pick_device()}  models: {params.models.diffusion}, {params.models.normals}")
    print(f"augment: k={args.shots}, {a.steps} LoRA steps at {a.resolution} px, "
          f"{int(aug['images'])} images ({a.n_per_shot}/shot, {a.inference_steps} steps x "
          f"strength {a.strength})")
    print(f"  LoRA training:   {aug['lora_s'] / max(aug['lora_steps'], 1):.4f} s/step")
    print(f"  img2img:         {aug['generate_s'] / max(aug['images'], 1):.4f} s/image")
    n_marigold = real["images"] + gen["images"]
    model_marigold = real["model_s"] + gen["model_s"]
    print(f"estimate_normals: {int(n_marigold)} images, {e.steps} steps, ensemble {e.ensemble}, "
          f"processing resolution {e.processing_resolution}")
    print(f"  Marigold:        {model_marigold / max(n_marigold, 1):.4f} s/image "
          f"(stage: {(real['total_s'] + gen['total_s']) / max(n_marigold, 1):.4f} s/image)")
    for name, runs in (("augment", [aug]), ("estimate_normals", [real, gen])):
        total = sum(r["total_s"] for r in runs)
        model = sum(r["model_s"] for r in runs)
        load = sum(r["load_s"] for r in runs)
        outside = (total - model) / total
        outside_no_load = (total - model - load) / max(total - load, 1e-9)
        print(f"  {name}: stage {total:.2f} s, model calls {model:.2f} s, loading {load:.2f} s; "
              f"outside model calls {100 * outside:.1f}% "
              f"({100 * outside_no_load:.1f}% excluding model loading)")


if __name__ == "__main__":
    main()
