"""Benchmark of the diffusion stages on the demo preset (CPU): LoRA steps, img2img images,
Marigold images, and the share of stage time spent outside model calls.

    .venv/bin/python benchmarks/diffusion.py [--shots 2] [--train-images 10] [--test-images 24]
                                             [--repeats 3] [--pivotal]

``--pivotal`` runs augment with the published pivotal-tuning recipe (presets/paper.yaml's
training keys) at the demo's budget: as many textual-inversion micro-steps as LoRA steps, the
warm-up shortened to a tenth of the steps; resolution, steps and images as params.yaml.

Runs the real stages (``stages.augment.run``, ``stages.estimate_normals.run``) with the
``augment``, ``estimate_normals`` and ``models`` values of params.yaml on synthetic 224 x 224
prepare stores in a temporary folder, as large as one category of the demo dataset.

Each stage instance runs in a fresh Python process, as DVC runs it: the first ``run()`` of a
process pays one-off costs (e.g. transformers builds its table of checkpoint key conversions on
the first ``from_pretrained``) that a second ``run()`` in the same process does not, so a
benchmark that warms up in-process understates what a stage costs. The process first imports
the libraries the stage uses (timed and printed, not counted as stage time), then calls
``run()`` twice: "fresh" is the first call (what a DVC stage pays), "steady" the second.
Before each call the stage's output is deleted (untimed), as ``dvc repro`` does.

"Model calls" is the time inside UNet/VAE/text-encoder calls, pipeline ``__call__``s and LoRA
training steps (``ModelClock``); "outside" is everything else inside ``run()``: model loading,
peft injection, store reads and writes, image conversion. Shares are given with and without
model loading. With ``--repeats`` > 1 the repeat with the median fresh share is printed,
with the range over all repeats (the machine is shared; single runs are noisy).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CMDS_AD_QUIET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.demo import DEMO_TEST_IMAGES, DEMO_TRAIN_IMAGES

Run = dict[str, float]

_LIBRARY_IMPORTS = "import diffusers, peft, transformers, torch"
# presets/paper.yaml's training keys (the generation budget stays the demo's).
PIVOTAL_KEYS = ("lora_targets", "train_text_encoder", "lr", "text_encoder_lr", "weight_decay",
                "lr_schedule", "grad_clip", "timestep_fraction", "interpolation",
                "color_jitter", "hflip", "cache_latents", "train_prompts", "placeholder_token",
                "textual_inversion", "prompt")
# What a stage process imports before run() (the stages import these lazily, inside run()):
# modules, then the lazily loaded classes of diffusers and transformers the stages use.
_MODULES = ("torch", "diffusers", "peft", "transformers", "zarr", "stages.augment",
            "stages.estimate_normals")
_CLASSES = {
    "diffusers": ("StableDiffusionImg2ImgPipeline", "StableDiffusionPipeline",
                  "MarigoldNormalsPipeline", "DDPMScheduler", "EulerAncestralDiscreteScheduler"),
    "transformers": ("CLIPTextModel", "CLIPTokenizer"),
    "peft": ("LoraConfig", "inject_adapter_in_model"),
}


def synthetic_prepare(size: int, n_train: int, n_test: int, shots: int) -> None:
    import numpy as np

    from pipeline.artifacts import StoreWriter
    from stages import layout

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


def child(kind: str, shots: int, params_file: Path) -> None:
    """One stage process: timed imports, then run() twice; prints JSON on stdout."""
    started = time.perf_counter()
    for module in _MODULES:
        importlib.import_module(module)
    for module, names in _CLASSES.items():
        for name in names:
            getattr(sys.modules[module], name)
    imports_s = time.perf_counter() - started
    import yaml

    from pipeline.params import parse_params
    from stages import augment, estimate_normals, layout

    params = parse_params(yaml.safe_load(params_file.read_text()))
    stage, output = {
        "augment": (lambda: augment.run(params, "bench", shots, 0),
                    layout.augmented("bench", shots, 0)),
        "real": (lambda: estimate_normals.run(params, "bench"), layout.normals("bench")),
        "generated": (lambda: estimate_normals.run(params, "bench", shots, 0),
                      layout.normals_generated("bench", shots, 0)),
    }[kind]
    runs = []
    for _ in range(2):
        # `dvc repro` deletes a stage's outputs before it runs the stage; so does this
        # (untimed), or run() would be timed replacing an old output.
        shutil.rmtree(output, ignore_errors=True)
        runs.append(stage())
    print(json.dumps({"imports_s": imports_s, "fresh": runs[0], "steady": runs[1]}))


def run_child(kind: str, shots: int, params_file: Path, project: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--shots", str(shots),
         "--params", str(params_file)],
        cwd=project, capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise SystemExit(f"{kind} stage process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_time() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LIBRARY_IMPORTS], check=True)
    return time.perf_counter() - started


def transformers_table_time() -> float | None:
    """The table transformers builds on a process's first ``from_pretrained`` (the largest
    one-off cost inside a fresh run()); None if this transformers version has none."""
    code = ("import time, transformers.conversion_mapping as m\n"
            "t = time.perf_counter(); m.get_checkpoint_conversion_mapping('clip')\n"
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return float(out.stdout) if out.returncode == 0 else None


def shares(runs: list[Run]) -> tuple[float, float, float, float, float]:
    """(stage s, model s, loading s, outside share, outside share excluding loading)."""
    total = sum(r["total_s"] for r in runs)
    model = sum(r["model_s"] for r in runs)
    load = sum(r["load_s"] for r in runs)
    return (total, model, load, (total - model) / total,
            (total - model - load) / max(total - load, 1e-9))


def report(name: str, repeats: list[dict[str, list[Run]]]) -> None:
    by_share = sorted(repeats, key=lambda r: shares(r["fresh"])[3])
    median = by_share[(len(by_share) - 1) // 2]
    labels = {"fresh": "fresh process, as DVC runs it", "steady": "2nd run() in the process"}
    for when, label in labels.items():
        total, model, load, outside, no_load = shares(median[when])
        spread = [100 * shares(r[when])[3] for r in repeats]
        span = f" (range {min(spread):.1f}-{max(spread):.1f}% over {len(spread)} repeats)" \
            if len(spread) > 1 else ""
        print(f"  {name}, {label}: stage {total:.3f} s = model calls {model:.3f} s + loading "
              f"{load:.3f} s + other {total - model - load:.3f} s")
        print(f"    outside model calls {100 * outside:.1f}%{span}; "
              f"{100 * no_load:.1f}% excluding model loading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=DEMO_TRAIN_IMAGES)
    parser.add_argument("--test-images", type=int, default=DEMO_TEST_IMAGES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--pivotal", action="store_true",
                        help="augment with the published pivotal-tuning recipe (demo budget)")
    parser.add_argument("--child", choices=("augment", "real", "generated"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.shots, args.params)
        return

    import yaml

    from pipeline.models.diffusion import resolve_source
    from pipeline.params import parse_params

    raw = yaml.safe_load(args.params.read_text())
    if args.pivotal:
        paper = yaml.safe_load((REPO / "presets" / "paper.yaml").read_text())["augment"]
        steps = raw["augment"]["steps"]
        raw["augment"].update({k: paper[k] for k in PIVOTAL_KEYS})
        raw["augment"]["textual_inversion"] = {**paper["textual_inversion"], "steps": steps}
        raw["augment"]["lr_warmup_steps"] = max(1, steps // 10)
    cache = (REPO / raw["models"]["cache_dir"]).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as tmp:
        project = Path(tmp)
        os.chdir(project)
        Path("data/bench").mkdir(parents=True)
        raw["data"].update(root="data", categories=["bench"])
        raw["models"]["cache_dir"] = str(cache)
        raw["fewshot"]["shots"] = [args.shots]
        raw["fit_mapper"]["steps"] = {args.shots: 1}
        params = parse_params(raw)
        params_file = project / "params.yaml"
        params_file.write_text(yaml.safe_dump(raw))
        if args.train_images < args.shots:
            parser.error(f"--train-images {args.train_images} < --shots {args.shots}")
        synthetic_prepare(params.data.size, args.train_images, args.test_images, args.shots)
        # Build the demo model folders once (a one-off per machine, not part of a stage run).
        resolve_source(params.models.diffusion, "models.diffusion", cache)
        resolve_source(params.models.normals, "models.normals", cache)
        library_s, table_s = import_time(), transformers_table_time()
        aug_runs, normals_runs, imports = [], [], []
        for _ in range(args.repeats):
            aug = run_child("augment", args.shots, params_file, project)
            real = run_child("real", args.shots, params_file, project)
            gen = run_child("generated", args.shots, params_file, project)
            imports += [aug["imports_s"], real["imports_s"], gen["imports_s"]]
            aug_runs.append({w: [aug[w]] for w in ("fresh", "steady")})
            normals_runs.append({w: [real[w], gen[w]] for w in ("fresh", "steady")})

    from pipeline.device import pick_device

    a, e = params.augment, params.estimate_normals
    aug = aug_runs[0]["steady"][0]  # per-step and per-image model times: any run will do
    real, gen = normals_runs[0]["steady"]
    print(f"device: {pick_device()}  models: {params.models.diffusion}, {params.models.normals}")
    print(f"python start + `{_LIBRARY_IMPORTS}`: {library_s:.2f} s; a stage process's imports "
          f"before run(): {statistics.median(imports):.2f} s (median; not counted below)")
    print(f"augment: k={args.shots}, {a.textual_inversion.steps} textual inversion + "
          f"{a.steps} LoRA steps at {a.resolution} px, "
          f"{int(aug['images'])} images ({a.n_per_shot}/shot, {a.inference_steps} steps x "
          f"strength {a.strength})")
    print(f"  training:        {aug['lora_s'] / max(aug['lora_steps'], 1):.4f} s/step "
          f"(TI and LoRA steps together; {aug['lora_s']:.2f} s)")
    print(f"  img2img:         {aug['generate_s'] / max(aug['images'], 1):.4f} s/image")
    n_marigold = real["images"] + gen["images"]
    model_marigold = real["model_s"] + gen["model_s"]
    print(f"estimate_normals: {int(n_marigold)} images, {e.steps} steps, ensemble {e.ensemble}, "
          f"processing resolution {e.processing_resolution} (two stage runs: real, generated)")
    print(f"  Marigold:        {model_marigold / max(n_marigold, 1):.4f} s/image "
          f"(stage: {(real['total_s'] + gen['total_s']) / max(n_marigold, 1):.4f} s/image)")
    report("augment", aug_runs)
    report("estimate_normals", normals_runs)
    if table_s is not None:
        print(f"fresh vs 2nd run(): one-off costs of a process's first run(), mostly transformers "
              f"building its checkpoint-conversion table on the first from_pretrained "
              f"({table_s:.3f} s, once per stage process)")


if __name__ == "__main__":
    main()
