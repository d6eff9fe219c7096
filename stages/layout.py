"""Where each stage reads and writes, relative to the project root (the DVC root).

``dvc.yaml`` and ``upstream/dvc.yaml`` name the same paths; keep them in step.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import read_json
from pipeline.errors import InputError

ARTIFACTS = Path("artifacts")
RESULTS = Path("results")


def run_key(shots: int, seed: int) -> str:
    return f"k{shots}-s{seed}"


def params_check() -> Path:
    """Written by ``validate_params`` when params.yaml is valid; ``prepare`` depends on it."""
    return ARTIFACTS / "params.valid"


def prepared(category: str) -> Path:
    """Directory with train.zarr (the shot pool), test.zarr and shots.json."""
    return ARTIFACTS / "prepare" / category


def shots_file(category: str) -> Path:
    return prepared(category) / "shots.json"


def read_shot_ids(category: str, shots: int, seed: int) -> list[str]:
    """The shot ids that prepare chose for (k, seed), from shots.json."""
    path = shots_file(category)
    table = read_json(path, "shots file not found (run the prepare stage)")
    key = run_key(shots, seed)
    if not isinstance(table, dict) or key not in table:
        have = ", ".join(sorted(table)) if isinstance(table, dict) else "nothing"
        raise InputError(
            f"{path}: no shots for {key!r} (has: {have}); add k to fewshot.shots (and the seed "
            "to fewshot.seeds) and re-run prepare; k cannot exceed the number of training samples"
        )
    ids = table[key]
    if not isinstance(ids, list) or len(ids) != shots:
        raise InputError(f"{path}: entry {key!r} must list {shots} sample ids")
    return [str(i) for i in ids]


def augmented(category: str, shots: int, seed: int) -> Path:
    """Directory with lora.safetensors and generated.zarr."""
    return ARTIFACTS / "augment" / category / run_key(shots, seed)


def normals(category: str) -> Path:
    """Directory with train.zarr and test.zarr of estimated normals."""
    return ARTIFACTS / "normals" / category


def normals_generated(category: str, shots: int, seed: int) -> Path:
    return ARTIFACTS / "normals_generated" / category / f"{run_key(shots, seed)}.zarr"


def features(category: str) -> Path:
    """Directory with train.zarr and test.zarr of backbone features."""
    return ARTIFACTS / "features" / category


def features_generated(category: str, shots: int, seed: int) -> Path:
    return ARTIFACTS / "features_generated" / category / f"{run_key(shots, seed)}.zarr"


def mappers(category: str, shots: int, seed: int) -> Path:
    """Directory with the four mapper checkpoints (safetensors) and config.json."""
    return ARTIFACTS / "mappers" / category / run_key(shots, seed)


def loss_curve(category: str, shots: int, seed: int) -> Path:
    return RESULTS / "loss" / category / f"{run_key(shots, seed)}.csv"


def streams(category: str, shots: int, seed: int) -> Path:
    """The four raw stream maps of the test set and its foreground (written by ``infer``)."""
    return ARTIFACTS / "streams" / category / f"{run_key(shots, seed)}.zarr"


def scores(category: str, shots: int, seed: int) -> Path:
    return ARTIFACTS / "scores" / category / f"{run_key(shots, seed)}.zarr"


def validation_streams(category: str, shots: int, seed: int) -> Path:
    """The four raw stream maps of the validation split (normal samples the model was not
    trained on) and its foreground, as ``streams``; written by ``validation_streams``."""
    return ARTIFACTS / "validation_streams" / category / f"{run_key(shots, seed)}.zarr"


def thresholds(category: str, shots: int, seed: int) -> Path:
    """The image and pixel thresholds fitted on the validation scores (JSON)."""
    return ARTIFACTS / "thresholds" / category / f"{run_key(shots, seed)}.json"


def evaluation(category: str, shots: int, seed: int) -> Path:
    """Directory with metrics.json, ablations.json, roc.csv, pro.csv and heatmap PNGs."""
    return RESULTS / "evaluate" / category / run_key(shots, seed)


def summary() -> Path:
    """Directory with summary.md/.csv, ablations.md/.csv and the overview figure."""
    return RESULTS / "summary"


def summary_metrics() -> Path:
    """The summary as DVC metrics: per k, the mean over categories of every metric (in %)."""
    return RESULTS / "summary.json"
