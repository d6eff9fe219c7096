"""Cost of ``cmds-ad predict``: per-sample latency of each step and peak memory.

    python benchmarks/predict.py                      # builds a demo project (one category,
                                                      # k = 1, `dvc repro`: a few minutes)
    python benchmarks/predict.py --keep DIR           # ... in DIR, kept (later: --project DIR)
    python benchmarks/predict.py --project DIR        # a finished project
    python benchmarks/predict.py --project DIR --model disc/k1-s0 --input data/demo/disc/test

It loads the model once (``Predictor.load``, timed), predicts the input once to warm up, then
``--repeats`` more times (default 3) and prints, per step of :class:`pipeline.prediction.
Predictor` (read, preprocess, normals, features, mappers, score), the median milliseconds
per sample, with the total; then the peak resident memory of the process (and the peak CUDA
memory on a GPU). The writing of ``--out`` (TIFF, PNGs, CSV) is timed separately by one
``cmds-ad predict`` run. Load average before and after: the development machine is shared.

The paper preset's shapes (DINO ViT-B/8, Marigold normals v1-1 at its 768 px processing
resolution, CAHFM mappers at 224) with random weights, no project and no DVC::

    python benchmarks/predict.py --paper-shapes --smoke    # 1 sample, Marigold 1 step x 1
    python benchmarks/predict.py --paper-shapes            # the published budget (10 x 10)
    python benchmarks/predict.py --paper-shapes --samples 4 --set estimate_normals.steps=4

builds the random-weight Marigold and DINO once (``tools/paper_models.py``:
``ensure_prediction_models``, in ``~/.cache/cmds-ad-paper-models``, ~5 GB, without SD 2.1's
UNet), the four CAHFM mappers with random weights at DINO's widths, a demo category in the
MVTec 3D-AD layout under a temporary folder, and measures ``presets/paper.yaml``'s prediction
path on it (``--smoke``: one sample, one repeat, one Marigold step and ensemble member; on a
CPU the published budget takes minutes per sample, on a GPU seconds). The scores mean nothing
(random weights); the latencies and the peak memory are those of the published shapes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.scratch_project import make_project, project_env, sh

DEMO = {"fewshot.shots": [1]}


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def demo_project(keep: Path | None) -> Path:
    root = keep or Path(tempfile.mkdtemp(prefix="cmds-ad-predict-bench-")) / "cmds-ad"
    started = time.perf_counter()
    make_project(root, DEMO)
    sh(["dvc", "repro"], root)
    print(f"demo project {root}: dvc repro in {time.perf_counter() - started:.0f} s")
    return root


def overridden(params, settings: list[str]):
    """``params`` with ``KEY=VALUE`` settings (YAML values) of the prediction path applied."""
    import yaml

    from pipeline.params import parse_params
    from tools.scratch_project import deep_update

    raw = params.model_dump(mode="json")
    deep_update(raw, {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in settings)})
    return parse_params(raw, "--set")


def measure(project: Path, model: str, input_path: str, repeats: int,
            settings: list[str]) -> None:
    from pipeline.predict_input import find_samples
    from pipeline.prediction import Predictor
    from stages.predict import project_model

    os.chdir(project)
    trained = project_model(model)
    params = overridden(trained.params, settings) if settings else trained.params
    refs = find_samples(Path(input_path))
    predictor = Predictor.load(params, trained.category, trained.mapper_dir)
    print(f"model {model}: loaded in {predictor.seconds['load']:.2f} s on {predictor.device}; "
          f"{len(refs)} samples from {input_path}, chunks of {predictor.chunk_size()}")
    time_steps(predictor, refs, repeats)


def time_steps(predictor, refs: list, repeats: int) -> None:
    """Predict ``refs`` once to warm up, then ``repeats`` times; print the median per-sample
    milliseconds of each step, the peak resident memory (and the peak CUDA memory)."""
    import torch

    from pipeline.prediction import STEPS

    per_step: dict[str, list[float]] = {step: [] for step in STEPS}
    for repeat in range(repeats + 1):
        before = dict(predictor.seconds)
        for _ in predictor.predict(refs, "benchmark"):
            pass
        if repeat == 0:
            continue  # warm-up
        for step in STEPS:
            per_step[step].append((predictor.seconds[step] - before[step]) / len(refs) * 1e3)
    print(f"\nper sample, median of {repeats} runs (ms):")
    total = 0.0
    for step in STEPS:
        value = statistics.median(per_step[step])
        total += value
        print(f"  {step:<11} {value:9.1f}")
    print(f"  {'total':<11} {total:9.1f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mib:.0f} MiB")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


PAPER_CATEGORY = "bagel"  # an official name; the demo's disc is rendered under it
SMOKE = ["estimate_normals.steps=1", "estimate_normals.ensemble=1"]


def paper_params(preset: Path, data_root: Path, models: dict[str, str], settings: list[str]):
    """The preset's parameters on the demo category, with the random-weight models."""
    import yaml

    from pipeline.params import parse_params

    raw = yaml.safe_load(preset.read_text())
    raw["data"].update(root=str(data_root), categories=[PAPER_CATEGORY])
    raw["models"].update(models)
    return overridden(parse_params(raw, str(preset)), settings)


def paper_shapes(preset: Path, models_cache: Path | None, samples: int, repeats: int,
                 settings: list[str]) -> None:
    """The paper preset's prediction path on random weights (see the module docstring)."""
    import shutil

    from pipeline.data import list_samples
    from pipeline.data.demo import write_demo_category
    from pipeline.models.backbones import load_backbone
    from pipeline.prediction import Predictor
    from tools.paper_models import ensure_prediction_models, write_random_mappers

    started = time.perf_counter()
    models = ensure_prediction_models(models_cache)
    print(f"random-weight models ready in {time.perf_counter() - started:.1f} s: {models}")
    work = Path(tempfile.mkdtemp(prefix="cmds-ad-predict-paper-"))
    try:
        write_demo_category(work / "data" / PAPER_CATEGORY, "disc", seed=0, n_train=1,
                            n_test=samples, n_validation=0)
        params = paper_params(preset, work / "data", models, settings)
        p = params.extract_features
        backbone = load_backbone(params.models.backbone, p.layers,
                                 cache_dir=params.models.cache_dir)
        channels, grid = backbone.probe(params.data.size, params.data.size)
        features = {"backbone": backbone.name, "layers": list(backbone.layers), "grid": grid,
                    "channels": channels}
        del backbone
        write_random_mappers(work / "mappers", params.fit_mapper.architecture,
                             params.fit_mapper.resolution, features)
        refs = list_samples("mvtec3d", work / "data", PAPER_CATEGORY, "test")
        e = params.estimate_normals
        print(f"preset {preset.name}: Marigold {e.steps} steps x ensemble {e.ensemble} "
              f"({e.precision}), {params.fit_mapper.architecture} mappers at "
              f"{params.fit_mapper.resolution}, features {features}; {len(refs)} test samples "
              "(320 x 320)")
        predictor = Predictor.load(params, PAPER_CATEGORY, work / "mappers")
        print(f"models loaded in {predictor.seconds['load']:.1f} s on {predictor.device}; "
              f"chunks of {predictor.chunk_size()}")
        time_steps(predictor, refs, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cli_run(project: Path, model: str, input_path: str) -> None:
    out = Path(tempfile.mkdtemp(prefix="predict-out-")) / "out"
    started = time.perf_counter()
    subprocess.run(["cmds-ad", "predict", "--model", model, "--input", input_path, "--out",
                    str(out)], cwd=project, env=project_env(), check=True, capture_output=True)
    print(f"\n`cmds-ad predict` (process start, model loading, prediction, writing --out): "
          f"{time.perf_counter() - started:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, help="A finished project (`dvc repro` ran).")
    parser.add_argument("--keep", type=Path, help="Build the demo project here and keep it.")
    parser.add_argument("--model", default="disc/k1-s0")
    parser.add_argument("--input", default="data/demo/disc/test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of the prediction path, in memory (repeatable)")
    parser.add_argument("--paper-shapes", action="store_true",
                        help="the paper preset's models with random weights (no project)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --paper-shapes: 1 sample, 1 repeat, Marigold 1 x 1")
    parser.add_argument("--samples", type=int, default=None,
                        help="with --paper-shapes: test samples (default 3; --smoke 1)")
    parser.add_argument("--preset", type=Path, default=REPO / "presets" / "paper.yaml")
    parser.add_argument("--models", type=Path, default=None,
                        help="cache of the random-weight models (~/.cache/cmds-ad-paper-models)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CMDS_AD_QUIET", "1")
    print(f"load average before: {load_average()}")
    if args.paper_shapes:
        samples = args.samples or (1 if args.smoke else 3)
        repeats = 1 if args.smoke else args.repeats
        paper_shapes(args.preset, args.models, samples, repeats,
                     (SMOKE if args.smoke else []) + args.set)
        print(f"load average after: {load_average()}")
        return 0
    project = (args.project or demo_project(args.keep)).resolve()
    measure(project, args.model, args.input, args.repeats, args.set)
    if not args.set:  # the command line reads params.yaml as it is
        cli_run(project, args.model, args.input)
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
