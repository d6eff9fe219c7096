"""Stage ``extract_features``: frozen-backbone features of RGB and normal images (DESIGN 1.4).

Without shots (keyed by category): the prepared train/test images (RGB and real normals) and
their estimated normals -> ``artifacts/features/<cat>/{train,test}.zarr`` with ``rgb_l``,
``real_l``, ``est_l``. With shots/seed: the generated images and their estimated normals ->
``artifacts/features_generated/<cat>/k<k>-s<seed>.zarr`` with ``rgb_l``, ``est_l``.
Noisy copies (``extract_features.noisy_copies``) are made for the train and generated stores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import Store, atomic_dir, open_store, provenance
from pipeline.determinism import deterministic
from pipeline.device import pick_device
from pipeline.errors import InputError, ParamsError
from pipeline.features import Noise, Source, check_sources, extract_store
from pipeline.models.backbones import Backbone, frozen_backbone
from pipeline.params import Params, section_dict
from pipeline.progress import info
from stages import layout

STAGE = "extract_features"
SPLITS = ("train", "test")


def _open(path: Path, maker: str, command: str) -> Store:
    """Open an input store, or say which stage makes it."""
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: input store not found; it is made by the `{maker}` stage (`cmds-ad {command}`)")
    return open_store(path)


def _backbone(params: Params) -> Backbone:
    sec = params.extract_features
    return frozen_backbone(params.models.backbone, sec.layers, sec.precision, pick_device(),
                           params.models.cache_dir)


def _attrs(params: Params, category: str, store: Store, inputs: list[Store], **extra: Any) -> dict[str, Any]:
    ids = list(store.attrs.get("ids", []))
    labels = store.attrs.get("labels", [0] * len(ids))  # generated images are normal
    if "defect_types" in store.attrs:
        extra["defect_types"] = list(store.attrs["defect_types"])
    return {
        **provenance(
            STAGE,
            section_dict(params.extract_features),
            models={"backbone": params.models.backbone},
            inputs=[str(s.path) for s in inputs],
            category=category,
            **extra,
        ),
        "ids": ids,
        "labels": list(labels),
    }


def run_real(params: Params, category: str) -> dict[str, float]:
    sec = params.extract_features
    stores = {}
    for split in SPLITS:
        prepared = _open(layout.prepared(category) / f"{split}.zarr", "prepare", f"prepare {category}")
        estimated = _open(
            layout.normals(category) / f"{split}.zarr", "estimate_normals", f"estimate-normals {category}"
        )
        stores[split] = [
            Source("rgb", prepared, "rgb", "rgb"),
            Source("real", prepared, "normals", "normals"),
            Source("est", estimated, "normals", "normals"),
        ]
        check_sources(stores[split])  # fail on bad input before loading the model
    loading = time.perf_counter()
    backbone = _backbone(params)
    load_s = time.perf_counter() - loading
    with atomic_dir(layout.features(category)) as tmp:
        for split in SPLITS:
            sources = stores[split]
            noisy = split == "train"
            attrs = _attrs(params, category, sources[0].store, [sources[0].store, sources[2].store], split=split)
            noise = Noise(sec.noisy_copies if noisy else 0, sec.noise_sigma, sec.seed, f"{category}/{split}",
                          sec.noise_space)
            extract_store(
                backbone, sources, tmp / f"{split}.zarr", attrs,
                batch_size=sec.batch_size, noise=noise, description=f"features {category}/{split}",
                dtype=sec.feature_dtype,
            )
    info(f"features of {category} -> {layout.features(category)}")
    return {"load_s": load_s}


def run_generated(params: Params, category: str, shots: int, seed: int) -> dict[str, float]:
    sec = params.extract_features
    args = f"{category} --shots {shots} --seed {seed}"
    generated = _open(layout.augmented(category, shots, seed) / "generated.zarr", "augment", f"augment {args}")
    estimated = _open(
        layout.normals_generated(category, shots, seed), "estimate_normals", f"estimate-normals {args}"
    )
    sources = [Source("rgb", generated, "rgb", "rgb"), Source("est", estimated, "normals", "normals")]
    check_sources(sources)
    loading = time.perf_counter()
    backbone = _backbone(params)
    load_s = time.perf_counter() - loading
    extra: dict[str, Any] = {"shots": shots, "seed": seed}
    if "source_ids" in generated.attrs:
        extra["source_ids"] = list(generated.attrs["source_ids"])
    attrs = _attrs(params, category, generated, [generated, estimated], **extra)
    key = layout.run_key(shots, seed)
    noise = Noise(sec.noisy_copies, sec.noise_sigma, sec.seed, f"{category}/generated/{key}", sec.noise_space)
    out = layout.features_generated(category, shots, seed)
    extract_store(
        backbone, sources, out, attrs,
        batch_size=sec.batch_size, noise=noise, description=f"features {category}/{key}",
        dtype=sec.feature_dtype,
    )
    info(f"features of generated {category}/{key} -> {out}")
    return {"load_s": load_s}


def run(params: Params, category: str, shots: int | None = None,
        seed: int | None = None) -> dict[str, float]:
    """Write the features; returns the seconds spent loading the backbone (``load_s``)."""
    if shots is None and seed is not None:
        raise ParamsError("extract_features: --seed is only meaningful with --shots")
    if shots is not None and shots < 1:
        raise ParamsError(f"extract_features: --shots must be >= 1 (got {shots})")
    with deterministic(pick_device(), warn_only=True):  # same inputs, same kernels, same bytes
        if shots is None:
            return run_real(params, category)
        return run_generated(params, category, shots, 0 if seed is None else seed)
