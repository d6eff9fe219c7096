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

The paper preset's shapes (DINO ViT-B/8, Marigold v1-1, 224 px) with random weights: the
scratch project of ``benchmarks/paper_smoke.py --smoke --keep DIR`` (it builds the
random-weight models with ``tools/paper_models.py`` and runs the paper preset with cut
budgets), then the published Marigold budget back for the measurement (``--set`` changes a
parameter of the prediction path in memory, not params.yaml)::

    python benchmarks/predict.py --project DIR --model bagel/k1-s0 --input DIR-data/bagel/test \
        --set estimate_normals.steps=10 --set estimate_normals.ensemble=10

(on a CPU this takes hours; on a GPU minutes).
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
    import torch

    from pipeline.predict_input import find_samples
    from pipeline.prediction import STEPS, Predictor
    from stages.predict import project_model

    os.chdir(project)
    trained = project_model(model)
    params = overridden(trained.params, settings) if settings else trained.params
    refs = find_samples(Path(input_path))
    predictor = Predictor.load(params, trained.category, trained.mapper_dir)
    print(f"model {model}: loaded in {predictor.seconds['load']:.2f} s on {predictor.device}; "
          f"{len(refs)} samples from {input_path}, chunks of {predictor.chunk_size()}")
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CMDS_AD_QUIET", "1")
    print(f"load average before: {load_average()}")
    project = (args.project or demo_project(args.keep)).resolve()
    measure(project, args.model, args.input, args.repeats, args.set)
    if not args.set:  # the command line reads params.yaml as it is
        cli_run(project, args.model, args.input)
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
