"""The paper preset, every stage through DVC, on the published architectures with random weights.

    python benchmarks/paper_smoke.py --smoke            # one category, k = 1, smallest budgets
    python benchmarks/paper_smoke.py --smoke --keep DIR # keep the scratch project in DIR
    python benchmarks/paper_smoke.py --smoke --set augment.steps=2 --set fit_mapper.lr=3e-4

What it checks: that ``presets/paper.yaml`` (or ``--preset``) runs from ``prepare`` to
``report`` without a shape, dtype or config error on models built from the published configs
(``tests/fixtures/paper_models/``, written once by ``tools/paper_models.py`` under
``~/.cache/cmds-ad-paper-models``: ~7 GB, a few minutes the first time). Only the budgets are
cut (one denoising step, ensemble 1, one step per mapper, k = 1, one image per shot); every
protocol setting stays the preset's, with ``fit_mapper.noise: online`` (fresh noise through the
backbone every step) as the preset has it. The LoRA comes from a released-layout file with
random weights (``augment.lora: official``; ``--lora train`` trains it for one step instead). The data are a tiny demo dataset in the MVTec
3D-AD layout (2 train, 1 validation, 3 test samples) under an official category name, beside the
project (``<project>-data``, an absolute ``data.root`` as for a real dataset).

It prints the wall time of each stage instance and of the whole ``dvc repro`` and exits
non-zero, with the failing stage's output, on any error. The numbers it produces mean nothing
(random weights); the run is about shapes, dtypes and configs.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.paper_models import ensure_paper_models  # noqa: E402
from tools.scratch_project import (  # noqa: E402
    clone_repository,
    project_env,
    sh,
    write_params,
)

CATEGORY = {"mvtec3d": "bagel", "eyecandies": "CandyCane"}
DEMO_SOURCE = "disc"  # the demo object rendered under the official name


def budget_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The smallest budgets, for the keys the preset has (a key it lacks is skipped)."""
    strength = float(params.get("augment", {}).get("strength", 1.0))
    wanted: dict[str, Any] = {
        "fewshot.shots": [1],
        "fewshot.seeds": [0],
        "augment.steps": 1,
        "augment.textual_inversion.steps": 1,  # the pivotal-tuning recipe's first phase
        "augment.n_per_shot": 1,
        # img2img runs int(steps * strength) denoising steps: the fewest that give one
        "augment.inference_steps": max(1, math.ceil(1 / strength - 1e-9)),
        "estimate_normals.steps": 1,
        "estimate_normals.ensemble": 1,
        # one step per mapper: each step at 224 x 224 x 2304 channels is tens of seconds on
        # this CPU, and with fit_mapper.noise online it adds two ViT-B/8 forwards per stream
        "fit_mapper.steps": {1: 1},
        "evaluate.heatmaps_per_class": 1,
    }
    present = {}
    for dotted, value in wanted.items():
        node: Any = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and leaf in node:
            present[dotted] = value
    return present


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def released_lora(dest: Path, category: str) -> dict[str, Any]:
    """Random LoRA weights in the published lora_pti layout for the paper SD 2.1-base
    (``<dest>-lora/<category>/final_lora.safetensors``) and the overrides that use them."""
    from tools.paper_models import build_component, load_fixture
    from tools.released_lora import write_random_lora_pti

    comps = load_fixture("sd21_base")["components"]
    root = dest.with_name(f"{dest.name}-lora")
    write_random_lora_pti(root, category, build_component(comps["unet"], meta=True),
                          build_component(comps["text_encoder"], meta=True))
    return {"augment.lora": "official", "augment.lora_checkpoints": str(root)}


def make_paper_project(dest: Path, preset: Path, models: dict[str, str],
                       extra: dict[str, Any], lora: str = "official") -> dict[str, Any]:
    """A clone of this repository with the preset as params.yaml, and a tiny dataset beside it
    (``<dest>-data``, an absolute ``data.root``, as for a real dataset); with ``lora``
    official, released-layout LoRA files with random weights beside it too."""
    from pipeline.data.demo import write_demo_category

    params = yaml.safe_load(preset.read_text())
    dataset = params["data"]["dataset"]
    if dataset != "mvtec3d":
        raise SystemExit(f"{preset}: data.dataset {dataset!r}: only the MVTec 3D-AD layout is "
                         "generated here")
    category = CATEGORY[dataset]
    data_root = dest.with_name(f"{dest.name}-data")
    write_demo_category(data_root / category, DEMO_SOURCE, seed=0, n_train=2, n_test=3,
                        n_validation=1)
    clone_repository(dest)
    shutil.copy2(preset, dest / "params.yaml")
    overrides = {
        "data.root": str(data_root), "data.categories": [category],
        "models.diffusion": models["diffusion"], "models.normals": models["normals"],
        "models.backbone": models["backbone"],
        **budget_overrides(params),
        **(released_lora(dest, category) if lora == "official" else {}), **extra,
    }
    write_params(dest, overrides)
    sh(["git", "commit", "-q", "-am", "paper smoke project"], dest)
    return overrides


def timed_repro(project: Path) -> tuple[int, list[tuple[str, float]], float, str]:
    """`dvc repro`, streaming: the wall time of each stage instance (until the next starts)."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=project_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stages: list[tuple[str, float]] = []
    current, since = None, start
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current is not None:
                stages.append((current, now - since))
                print(f"  {stages[-1][1]:8.1f} s  {current}", flush=True)
            current, since = line.split("'")[1], now
    rc = proc.wait()
    end = time.perf_counter()
    if current is not None:
        stages.append((current, end - since))
        print(f"  {stages[-1][1]:8.1f} s  {current}{'' if rc == 0 else '  (FAILED)'}", flush=True)
    return rc, stages, end - start, "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="smallest budgets (the only mode)")
    parser.add_argument("--preset", type=Path, default=REPO / "presets" / "paper.yaml")
    parser.add_argument("--models", type=Path, default=None,
                        help="cache of the random-weight models (default ~/.cache/cmds-ad-paper-models)")
    parser.add_argument("--keep", type=Path, default=None, help="build the scratch project here and keep it")
    parser.add_argument("--lora", choices=["official", "train"], default="official",
                        help="official (default): released-layout LoRA files with random "
                             "weights (augment.lora: official); train: the preset's training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more params override (YAML value), e.g. augment.steps=2")
    args = parser.parse_args()
    if not args.smoke:
        parser.error("only --smoke is implemented: the paper budgets need a GPU (use dvc repro)")

    t0 = time.perf_counter()
    models = ensure_paper_models(args.models)
    build_s = time.perf_counter() - t0
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="paper-smoke-")
        project = Path(tmp.name) / "project"
    else:
        project = args.keep.resolve()
        if project.exists():
            raise SystemExit(f"--keep {project}: exists; give a new folder")
    try:
        overrides = make_paper_project(project, args.preset, models, parse_set(args.set),
                                       args.lora)
        print(f"preset: {args.preset.relative_to(REPO) if args.preset.is_relative_to(REPO) else args.preset}")
        print(f"models (random weights, published architectures; ready in {build_s:.1f} s):")
        for key in ("diffusion", "normals", "backbone"):
            print(f"  models.{key}: {models[key]}")
        print("overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items()
                                        if not k.startswith("models.")))
        print(f"project: {project}")
        print("dvc repro, wall time per stage instance:")
        rc, stages, total, output = timed_repro(project)
        if rc != 0:
            print(output[-12000:], file=sys.stderr)
            print(f"FAILED: dvc repro exited {rc} after {total:.1f} s", file=sys.stderr)
            return 1
        by_stage: dict[str, float] = {}
        for name, seconds in stages:
            key = name.split("@")[0].split(":")[-1]
            by_stage[key] = by_stage.get(key, 0.0) + seconds
        print("per stage:")
        for key, seconds in by_stage.items():
            print(f"  {seconds:8.1f} s  {key}")
        print(f"total dvc repro: {total:.1f} s ({len(stages)} stage instances)")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
