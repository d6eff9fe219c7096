"""A self-contained prediction bundle: everything ``cmds-ad predict --bundle`` reads.

Layout of a bundle folder::

    config.json     every parameter the prediction path reads (the data preprocessing keys,
                    models, estimate_normals, extract_features, infer, score), the category,
                    k and seed, the thresholds (and the map they apply to), the score
                    normalisation, and the backbone and Marigold used: spec, where their files
                    were, and each file's sha256
    mappers/        the four mappers (safetensors) and their config.json, as fit_mapper wrote
    manifest.json   the package version and the sha256 of every other file of the bundle

Loading checks, before any model runs: the manifest's version is this package's, every listed
file is there with its digest, no other file is there, and the backbone and Marigold files
on this machine have the recorded digests. Each refusal is one error naming the file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.artifacts import atomic_dir, atomic_write_json, file_sha256, read_json
from pipeline.errors import InputError, ModelError
from pipeline.outputs import MARKER, mark
from pipeline.params import Params, parse_params, section_dict
from pipeline.thresholds import PIXEL_MAP

FORMAT = "cmds-ad-bundle"
CONFIG, MANIFEST, MAPPERS = "config.json", "manifest.json", "mappers"
# The sections the prediction path reads (pipeline/prediction.py), whole.
SECTIONS = ("models", "estimate_normals", "extract_features", "infer", "score")
NORMALISATION = ("per image: map_roc = map / sqrt(mean(map)); image score = max(map) / "
                 "sqrt(mean of the non-zero map); map = the fused, foreground-masked, smoothed "
                 "stream maps (pipeline/scoring.py)")


@dataclass(frozen=True)
class TrainedModel:
    """Everything prediction reads (pipeline/prediction.py): the parameters of the prediction
    path, the folder of the four mappers and their config.json, and the (image, pixel)
    thresholds; a bundle's, or a project's (stages/predict.py)."""

    params: Params
    category: str
    mapper_dir: Path
    thresholds: tuple[float, float]


def _folder_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_files(params: Params) -> dict[str, Any]:
    """The backbone and Marigold of ``params``: spec, files and their digests."""
    # here, not at the top: reading and checking a bundle imports no torch (a refusal is quick)
    from pipeline.models.backbones import load_backbone
    from pipeline.models.diffusion import resolve_source

    models = params.models
    marigold = resolve_source(models.normals, "models.normals", models.cache_dir)
    location = Path(marigold.location)
    normals = {"spec": models.normals, "kind": marigold.kind,
               "files": _folder_digests(location) if location.is_dir() else {}}
    backbone = load_backbone(models.backbone, params.extract_features.layers,
                             cache_dir=models.cache_dir)
    return {"normals": normals, "backbone": {"spec": models.backbone, "source": backbone.source}}


def export_bundle(params: Params, category: str, shots: int, seed: int, mapper_dir: Path,
                  thresholds: dict[str, Any], out: Path) -> None:
    """Write the bundle of (category, k, seed) to ``out`` atomically."""
    params_part = {name: section_dict(getattr(params, name)) for name in SECTIONS}
    data = section_dict(params.data)
    data["categories"] = [category]
    config = {
        "format": FORMAT, "category": category, "shots": shots, "seed": seed,
        "params": {"data": data, **params_part},
        "model_files": model_files(params),
        "thresholds": {"image": thresholds["image"]["threshold"],
                       "pixel": thresholds["pixel"]["threshold"], "pixel_map": PIXEL_MAP,
                       "fitted": {k: thresholds[k] for k in ("image", "pixel")}},
        "normalisation": NORMALISATION,
    }
    with atomic_dir(out) as tmp:
        shutil.copytree(mapper_dir, tmp / MAPPERS,
                        ignore=shutil.ignore_patterns(".*"))
        atomic_write_json(tmp / CONFIG, config)
        files = {k: v for k, v in _folder_digests(tmp).items() if k != MANIFEST}
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "version": __version__,
                                           "files": files})
        mark(tmp, "export")


def _read_json(path: Path) -> dict[str, Any]:
    value = read_json(path, "missing from the bundle (not a folder written by `cmds-ad export`?)")
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} file")
    return value


def _check_manifest(folder: Path) -> None:
    manifest = _read_json(folder / MANIFEST)
    if manifest.get("version") != __version__:
        raise InputError(f"{folder / MANIFEST}: bundle of cmds-ad {manifest.get('version')}, "
                         f"this is {__version__}; export it again with this version")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise InputError(f"{folder / MANIFEST}: no file list")
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: missing from the bundle (listed in {MANIFEST})")
        if file_sha256(path) != digest:
            raise InputError(f"{path}: altered since export (sha256 differs from {MANIFEST})")
    extra = sorted(set(_folder_digests(folder)) - set(listed) - {MANIFEST, MARKER})
    if extra:
        raise InputError(f"{folder / extra[0]}: not part of the bundle (not in {MANIFEST})")


def _check_model_files(recorded: dict[str, Any], params: Params) -> None:
    """The backbone and Marigold found here are the ones the bundle was exported with."""
    here = model_files(params)
    if here["backbone"]["source"] != recorded["backbone"]["source"]:
        raise ModelError(f"models.backbone {params.models.backbone!r}: the weights here "
                         f"({here['backbone']['source']}) are not the exported ones "
                         f"({recorded['backbone']['source']})")
    mine, theirs = here["normals"]["files"], recorded["normals"]["files"]
    for name, digest in theirs.items():
        if mine.get(name) != digest:
            what = "missing" if name not in mine else "different (sha256)"
            raise ModelError(f"models.normals {params.models.normals!r}: file {name} is {what} "
                             "here; the bundle needs the exported model files")


def load_bundle(folder: Path) -> TrainedModel:
    """The model of a bundle folder, after every check of the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: bundle folder not found")
    _check_manifest(folder)
    config = _read_json(folder / CONFIG)
    try:
        params = parse_params(config["params"], str(folder / CONFIG))
        category = str(config["category"])
        thresholds = (float(config["thresholds"]["image"]), float(config["thresholds"]["pixel"]))
        _check_model_files(config["model_files"], params)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{folder / CONFIG}: incomplete bundle config ({err!r})") from None
    return TrainedModel(params, category, folder / MAPPERS, thresholds)
