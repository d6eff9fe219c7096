"""Stage ``validation_streams`` (category, k, seed): the four raw stream maps of the
validation split, normal samples the model was not trained on, for the thresholds.

Reads   <data.root>/<cat>/ validation split (MVTec 3D-AD ``validation/good``, Eyecandies
        ``val``), artifacts/mappers/<cat>/k<k>-s<seed>/
Writes  artifacts/validation_streams/<cat>/k<k>-s<seed>.zarr: psi2d_real, psi2d_est,
        psi3d_real, psi3d_est (N, S, S) float16 and fg (N, S, S) uint8; attrs ids, labels,
        category (the layout of ``infer``'s store, so ``score``'s reader reads it)

The samples go through the prediction path (:mod:`pipeline.prediction`: preprocessing, real
and estimated normals, backbone, mappers), the same code ``cmds-ad predict`` runs and whose
maps equal the stages' on the test set. No ``score`` or ``thresholds`` parameter is read here:
changing one of them re-runs the cheap ``thresholds`` stage only. A dataset without a
validation split gets an empty store; the ``thresholds`` stage then needs manual thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import StoreWriter, provenance
from pipeline.data import SampleRef, list_samples
from pipeline.inference import STREAM_SPECS
from pipeline.params import Params, section_dict
from pipeline.prediction import Predictor
from pipeline.progress import info
from stages import layout

SPLIT = "validation"
SPLIT_FOLDERS = {"mvtec3d": "validation", "eyecandies": "val", "folder": "validation"}
MAP_SHARD_BYTES = 4 * 2**20  # as stages.infer


def validation_refs(params: Params, category: str) -> list[SampleRef]:
    """The validation samples of a category; none when the dataset has no such folder."""
    data = params.data
    if not (Path(data.root) / category / SPLIT_FOLDERS[data.dataset]).is_dir():
        return []
    return list_samples(data.dataset, data.root, category, SPLIT)


def run(params: Params, category: str, shots: int, seed: int = 0) -> dict[str, float]:
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
            writer.create(name, len(refs), (size, size), np.uint8 if name == "fg" else np.float16)
        if not refs:
            return {"load_s": 0.0}
        predictor = Predictor.load(params, category, mapper_dir)
        for chunk in predictor.streams(refs, f"validation {category}"):
            for name in STREAM_SPECS:
                writer.append(name, chunk.streams[name])
            writer.append("fg", chunk.fg)
    return {"load_s": predictor.seconds["load"]}
