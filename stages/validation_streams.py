"""Stage ``validation_streams`` (category, k, seed): the four raw stream maps of normal
samples the model was not trained on, for the thresholds (``thresholds.normal_samples``):

- ``validation``: the validation split;
- ``leave_one_out``: each of the k shots, under the four mappers trained as ``fit_mapper``
  trains them (same library calls, steps and seeds) without that shot and the images generated
  from it, run on its stored features as ``infer`` runs them on the test set. For data
  without a validation split; k trainings per (category, k, seed), k >= 2 (the validator).

Reads   validation: <data.root>/<cat>/ validation split (MVTec 3D-AD ``validation/good``,
        Eyecandies ``val``), artifacts/mappers/<cat>/k<k>-s<seed>/;
        leave_one_out: what ``fit_mapper`` reads, artifacts/prepare/<cat>/train.zarr (fg)
Writes  artifacts/validation_streams/<cat>/k<k>-s<seed>.zarr: psi2d_real, psi2d_est,
        psi3d_real, psi3d_est (N, S, S) of ``infer.map_dtype`` and fg (N, S, S) uint8; attrs
        ids, labels, category (the layout of ``infer``'s store, so ``score``'s reader reads it)

The validation samples go through the prediction path (:mod:`pipeline.prediction`:
preprocessing, real and estimated normals, backbone, mappers), the same code ``cmds-ad
predict`` runs and whose maps equal the stages' on the test set. No ``score`` parameter and
no ``thresholds`` parameter but ``normal_samples`` is read here: changing a rule or a fusion
weight re-runs the cheap ``thresholds`` stage only. A dataset without a validation split gets
an empty store; the ``thresholds`` stage then needs manual thresholds or ``normal_samples:
leave_one_out``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import StoreWriter, open_store, provenance
from pipeline.data import SampleRef, list_samples
from pipeline.device import pick_device
from pipeline.errors import ParamsError
from pipeline.inference import STREAM_SPECS
from pipeline.params import Params, section_dict
from pipeline.prediction import Predictor
from pipeline.progress import info
from pipeline.training import (
    N_LAYERS,
    feature_meta,
    open_prepared_with_fg,
    read_rows,
    rows_of,
)
from stages import layout

SPLIT = "validation"
MODALITIES = ("rgb", "real", "est")
SPLIT_FOLDERS = {"mvtec3d": "validation", "eyecandies": "val", "folder": "validation"}
MAP_SHARD_BYTES = 4 * 2**20  # as stages.infer


def validation_refs(params: Params, category: str) -> list[SampleRef]:
    """The validation samples of a category; none when the dataset has no such folder."""
    data = params.data
    if not (Path(data.root) / category / SPLIT_FOLDERS[data.dataset]).is_dir():
        return []
    return list_samples(data.dataset, data.root, category, SPLIT)


def leave_one_out(params: Params, category: str, shots: int, seed: int
                  ) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """The shots' ids, their stream maps (k, S, S) of ``infer.map_dtype`` (each under the
    mappers trained without it) and their foreground (k, S, S) uint8."""
    from pipeline.inference import stream_maps
    from stages.fit_mapper import train_mappers

    shot_ids = layout.read_shot_ids(category, shots, seed)
    if len(shot_ids) < 2:
        raise ParamsError(f"thresholds.normal_samples: leave_one_out needs k >= 2 shots, "
                          f"{category} {layout.run_key(shots, seed)} has {len(shot_ids)}; use "
                          "normal_samples: validation or set thresholds.image and .pixel")
    feat_path = layout.features(category) / "train.zarr"
    feats = open_store(feat_path)
    rows = rows_of(feat_path, feature_meta(feats, MODALITIES).ids, shot_ids,
                   str(layout.shots_file(category)))
    prep_path = layout.prepared(category) / "train.zarr"
    prep, prep_ids = open_prepared_with_fg(prep_path, "for the leave-one-out thresholds")
    fg = read_rows(prep, "fg", rows_of(prep_path, prep_ids, shot_ids,
                                       str(layout.shots_file(category))))
    size, p, device = params.data.size, params.infer, pick_device()  # as train_mappers
    maps: dict[str, list[np.ndarray]] = {name: [] for name in STREAM_SPECS}
    for shot, row in zip(shot_ids, rows):
        trained = train_mappers(params, category, shots, seed, left_out=shot)
        features = {m: [torch.from_numpy(np.asarray(feats[f"{m}_{l}"][row:row + 1],
                                                    dtype=np.float32)).to(device)
                        for l in range(N_LAYERS)] for m in MODALITIES}
        with torch.inference_mode():
            out = stream_maps(trained.mappers(), features, params.fit_mapper.resolution, size,
                              p.distance)
        for name in STREAM_SPECS:
            maps[name].append(out[name].float().cpu().numpy().astype(p.map_dtype))
    return shot_ids, {n: np.concatenate(v) for n, v in maps.items()}, \
        (np.asarray(fg) > 0).astype(np.uint8)


def run(params: Params, category: str, shots: int, seed: int = 0) -> dict[str, float]:
    if params.thresholds.normal_samples == "leave_one_out":
        return run_leave_one_out(params, category, shots, seed)
    refs = validation_refs(params, category)
    mapper_dir = layout.mappers(category, shots, seed)
    sections = {name: section_dict(getattr(params, name))
                for name in ("estimate_normals", "extract_features", "infer")}
    attrs = {"ids": [r.id for r in refs], "labels": [r.label for r in refs],
             "category": category,
             **provenance("validation_streams", sections, mappers=str(mapper_dir),
                          models={"normals": params.models.normals,
                                  "backbone": params.models.backbone})}
    info(f"validation_streams {category} {layout.run_key(shots, seed)}: {len(refs)} "
         "validation samples")
    size = params.data.size
    with StoreWriter(layout.validation_streams(category, shots, seed), attrs=attrs,
                     shard_bytes=MAP_SHARD_BYTES) as writer:
        for name in (*STREAM_SPECS, "fg"):
            writer.create(name, len(refs), (size, size),
                          np.uint8 if name == "fg" else np.dtype(params.infer.map_dtype))
        if not refs:
            return {"load_s": 0.0}
        predictor = Predictor.load(params, category, mapper_dir)
        for chunk in predictor.streams(refs, f"validation {category}"):
            for name in STREAM_SPECS:
                writer.append(name, chunk.streams[name])
            writer.append("fg", chunk.fg)
    return {"load_s": predictor.seconds["load"]}


def run_leave_one_out(params: Params, category: str, shots: int, seed: int) -> dict[str, float]:
    """``thresholds.normal_samples: leave_one_out``: the store holds the k shots."""
    sections = {name: section_dict(getattr(params, name))
                for name in ("extract_features", "fit_mapper", "infer")}
    info(f"validation_streams {category} {layout.run_key(shots, seed)}: leave-one-out over "
         f"the {shots} shots ({shots} trainings of the four mappers)")
    ids, maps, fg = leave_one_out(params, category, shots, seed)
    attrs = {"ids": ids, "labels": [0] * len(ids), "category": category,
             "normal_samples": "leave_one_out",
             **provenance("validation_streams", sections,
                          features=str(layout.features(category) / "train.zarr"))}
    size = params.data.size
    with StoreWriter(layout.validation_streams(category, shots, seed), attrs=attrs,
                     shard_bytes=MAP_SHARD_BYTES) as writer:
        for name in STREAM_SPECS:
            writer.create(name, len(ids), (size, size), np.dtype(params.infer.map_dtype))
            writer.append(name, maps[name])
        writer.create("fg", len(ids), (size, size), np.uint8)
        writer.append("fg", fg)
    return {"load_s": 0.0}
