"""Stage ``prepare`` (per category): read, preprocess, compute real normals, choose the shots.

Writes ``artifacts/prepare/<cat>/`` as one atomic directory:

- ``test.zarr``: the whole test split;
- ``train.zarr``: only the union of the shots of every k in ``fewshot.shots`` and seed in
  ``fewshot.seeds`` (sorted ids), so per-image work downstream is done once for all k;
- ``shots.json``: ``{"k<k>-s<seed>": [ids...]}``.

Arrays: ``rgb`` uint8, ``xyz`` float32, ``normals`` float16 (encoded (n + 1) / 2), ``fg`` and
``gt`` uint8 0/1, all (N, S, S[, 3]); ``no_gt`` (attribute, only when there are any): the
defective samples without a mask (``data.dataset: folder``), stored with an all-zero ``gt``.
Provenance: ``test.zarr`` records the ``data`` section only (it does not depend on the shots,
so changing ``fewshot`` leaves its bytes, and what is computed from it downstream,
unchanged); ``train.zarr`` records ``data`` and ``fewshot``. ``data.categories`` is left out
of both: adding a category must not change another one's; so is
``data.accept_empty_defect_masks``, which only lets a dataset through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import StoreWriter, atomic_dir, atomic_write_json, provenance
from pipeline.data import SampleRef, check_masks, list_samples, load_sample
from pipeline.data.fewshot import select_shots
from pipeline.data.preprocess import PreprocessConfig, preprocess, real_normals
from pipeline.errors import InputError, ParamsError
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from stages import layout

STAGE = "prepare"


def choose_shots(
    train_ids: list[str], shots: list[int], seeds: list[int], strategy: str, category: str
) -> dict[str, list[str]]:
    return {
        layout.run_key(k, seed): select_shots(train_ids, k, strategy, seed, category=category)
        for k in shots
        for seed in seeds
    }


def _write_split(
    path: Path,
    refs: list[SampleRef],
    cfg: PreprocessConfig,
    attrs: dict,
    description: str,
    eyecandies_xyz: str = "camera",
) -> None:
    s = cfg.size
    attrs = {
        **attrs,
        "ids": [r.id for r in refs],
        "labels": [r.label for r in refs],
        "defect_types": [r.defect_type for r in refs],
    }
    no_gt = [r.id for r in refs if r.label == 1 and r.gt is None]
    if no_gt:  # the folder layout's defective samples without a mask: no pixel metrics
        attrs["no_gt"] = no_gt
    with StoreWriter(path, attrs=attrs) as writer:
        writer.create("rgb", len(refs), (s, s, 3), np.uint8)
        writer.create("xyz", len(refs), (s, s, 3), np.float32)
        writer.create("normals", len(refs), (s, s, 3), np.float16)
        writer.create("fg", len(refs), (s, s), np.uint8)
        writer.create("gt", len(refs), (s, s), np.uint8)
        for ref in track(refs, description):
            raw = load_sample(ref, eyecandies_xyz)
            prep = preprocess(raw.rgb, raw.xyz, raw.gt, cfg, raw.background)
            if not prep.fg.any():
                raise InputError(
                    f"{ref.geometry_path}: no object points left after plane removal and "
                    f"clustering (check data.plane_distance, data.cluster_eps)"
                )
            normals = real_normals(raw.xyz, prep, cfg, raw.background)
            writer.append("rgb", prep.rgb[None])
            writer.append("xyz", prep.xyz[None])
            writer.append("normals", normals.astype(np.float16)[None])
            writer.append("fg", prep.fg[None])
            writer.append("gt", prep.gt[None])


def run(params: Params, category: str) -> None:
    data, fewshot = params.data, params.fewshot
    if category not in data.categories:
        raise ParamsError(
            f"data.categories: category {category!r} is not listed "
            f"(listed: {', '.join(data.categories)})"
        )
    train_refs = list_samples(data.dataset, data.root, category, "train")
    test_refs = list_samples(data.dataset, data.root, category, "test")
    check_masks(test_refs, data.accept_empty_defect_masks)
    shots = choose_shots(
        [r.id for r in train_refs], fewshot.shots, fewshot.seeds, fewshot.strategy, category
    )
    union = sorted({sid for ids in shots.values() for sid in ids})
    by_id = {r.id: r for r in train_refs}
    shot_refs = [by_id[sid] for sid in union]

    # Neither key changes what is stored: the category list, and a check's switch.
    unrecorded = ("categories", "accept_empty_defect_masks")
    data_params = {k: v for k, v in section_dict(data).items() if k not in unrecorded}
    common = {"category": category, "dataset": data.dataset}
    cfg = PreprocessConfig.from_params(data, category)
    info(f"prepare {category}: {len(test_refs)} test samples, {len(shot_refs)} shot samples")
    with atomic_dir(layout.prepared(category)) as tmp:
        _write_split(
            tmp / "train.zarr",
            shot_refs,
            cfg,
            {**provenance(STAGE, {"data": data_params, "fewshot": section_dict(fewshot)}), **common},
            f"prepare {category} shots",
            data.eyecandies_xyz,
        )
        _write_split(
            tmp / "test.zarr",
            test_refs,
            cfg,
            {**provenance(STAGE, {"data": data_params}), **common},
            f"prepare {category} test",
            data.eyecandies_xyz,
        )
        atomic_write_json(tmp / "shots.json", shots)
