"""``cmds-ad export CATEGORY --shots K --seed S --out DIR``: the prediction bundle of one
trained (category, k, seed) of this project (:mod:`pipeline.bundle`), for
``cmds-ad predict --bundle DIR`` on this or another machine."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import read_json
from pipeline.bundle import export_bundle
from pipeline.errors import InputError
from pipeline.params import Params
from stages import layout

COMMAND = "export"


def run(params: Params, category: str, shots: int, seed: int, out: Path) -> None:
    mapper_dir = layout.mappers(category, shots, seed)
    if not (mapper_dir / "config.json").is_file():
        raise InputError(f"{mapper_dir}: no trained model {category}/{layout.run_key(shots, seed)}"
                         " here (run `dvc repro` or `dvc pull` first)")
    path = layout.thresholds(category, shots, seed)
    thresholds = read_json(path, "thresholds not found (run `dvc repro` first)")
    export_bundle(params, category, shots, seed, mapper_dir, thresholds, out)
