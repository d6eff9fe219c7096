"""Stage ``infer`` (category, k, seed): the four raw stream maps of the test set (DESIGN 1.6).

Reads   artifacts/features/<cat>/test.zarr, artifacts/mappers/<cat>/k<k>-s<seed>/,
        artifacts/prepare/<cat>/test.zarr (fg, attrs ids/labels)
Writes  artifacts/streams/<cat>/k<k>-s<seed>.zarr: psi2d_real, psi2d_est, psi3d_real,
        psi3d_est (N, S, S) float32 (infer.map_dtype) and fg (N, S, S) uint8; attrs ids, labels, category

This is the only place the mappers run on the test set. No ``score`` parameter is read here, so
a change of a fusion weight, the fusion rule or the smoothing re-runs ``score`` and
``evaluate`` on these stored maps, not the mappers. The test set is streamed one batch
(infer.batch_size) at a time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import StoreWriter, open_store, provenance, require_same_ids
from pipeline.device import pick_device
from pipeline.errors import InputError
from pipeline.inference import STREAM_SPECS, load_mappers, stream_maps
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from pipeline.training import (
    FEATURE_KEYS,
    N_LAYERS,
    feature_meta,
    open_prepared_with_fg,
)
from stages import layout

MODALITIES = ("rgb", "real", "est")
# Five full-resolution map arrays: small shards keep the writer's buffer (one shard per
# array) well below the model's memory, so peak memory does not grow with the test set.
MAP_SHARD_BYTES = 4 * 2**20


def _check_matches(config: dict, config_path: str, meta, store_path: str) -> None:
    """The test features must come from the backbone/grid/widths the mappers were trained on."""
    for key in FEATURE_KEYS:
        trained = config.get(key)
        found = getattr(meta, key)
        if trained != found:
            raise InputError(
                f"{store_path}: feature {key} {found!r} does not match {trained!r} that the "
                f"mappers in {config_path} were trained on (re-run extract_features or fit_mapper)"
            )


def _check_features_fit(config: dict, mapper_dir: Path, meta: Any, feat_path: Path) -> None:
    """The test features come from the backbone and layers the mappers were trained on."""
    if "official" in config and config.get("backbone_source") is None:
        # Imported with `cmds-ad import-official` (no feature store at hand): the published
        # backbone and layers, whichever copy of its weights made the features.
        from pipeline.official import check_features

        check_features(config, meta, str(feat_path))
    else:
        _check_matches(config, str(mapper_dir / "config.json"), meta, str(feat_path))


def _test_labels_and_fg(category: str, feat_path: Path, ids: list[str]) -> tuple[list[int], Any]:
    """The test set's labels and its foreground array (N, S, S), checked against ``ids``."""
    prep_path = layout.prepared(category) / "test.zarr"
    prep, prep_ids = open_prepared_with_fg(prep_path, f"to score {feat_path}")
    require_same_ids(feat_path, ids, prep_path, prep_ids)
    labels = [int(v) for v in prep.attrs.get("labels", [])]
    if len(labels) != len(prep_ids):
        raise InputError(f"{prep_path}: attribute 'labels' has {len(labels)} entries for "
                         f"{len(prep_ids)} samples")
    fg_array = prep["fg"]
    if fg_array.ndim != 3 or fg_array.shape[0] != len(prep_ids) or \
            fg_array.shape[1] != fg_array.shape[2]:
        raise InputError(f"{prep_path}: 'fg' has shape {tuple(fg_array.shape)}, expected "
                         f"({len(prep_ids)}, S, S)")
    return labels, fg_array


def run(params: Params, category: str, shots: int, seed: int = 0) -> dict[str, float]:
    """Write the stream maps; returns the seconds spent loading the mappers (``load_s``)."""
    p = params.infer
    # 1. The mappers, and test features and foreground that fit them
    mapper_dir = layout.mappers(category, shots, seed)
    device = pick_device()
    loading = time.perf_counter()
    config, mappers = load_mappers(mapper_dir, device)
    load_s = time.perf_counter() - loading
    resolution = int(config.get("resolution", 0))
    if resolution < 1:
        raise InputError(f"{mapper_dir / 'config.json'}: missing or invalid 'resolution'")
    feat_path = layout.features(category) / "test.zarr"
    feats = open_store(feat_path)
    meta = feature_meta(feats, MODALITIES)
    _check_features_fit(config, mapper_dir, meta, feat_path)
    labels, fg_array = _test_labels_and_fg(category, feat_path, meta.ids)
    size, n = int(fg_array.shape[1]), len(meta.ids)
    attrs = {
        "ids": meta.ids,
        "labels": labels,
        "category": category,
        **provenance("infer", section_dict(p), mappers=str(mapper_dir),
                     architecture=config["architecture"], resolution=resolution,
                     backbone=meta.backbone),
    }
    info(f"infer {category} {layout.run_key(shots, seed)}: {n} test images on {device}")
    # 2. The four stream maps, batch by batch, and the foreground beside them
    names = [f"{m}_{l}" for m in MODALITIES for l in range(N_LAYERS)]
    dtype = np.dtype(p.map_dtype)
    with StoreWriter(layout.streams(category, shots, seed), attrs=attrs,
                     shard_bytes=MAP_SHARD_BYTES) as w:
        for name in STREAM_SPECS:
            w.create(name, n, (size, size), dtype)
        w.create("fg", n, (size, size), np.uint8)
        batches = feats.iter_batches(names, p.batch_size)
        total = -(-n // p.batch_size)
        for start, batch in zip(range(0, n, p.batch_size),
                                track(batches, f"infer {category}", total=total)):
            features = {  # modality -> per layer [B, C_l, h, w] float32
                m: [torch.from_numpy(np.asarray(batch[f"{m}_{l}"], dtype=np.float32)).to(device)
                    for l in range(N_LAYERS)]
                for m in MODALITIES
            }
            with torch.inference_mode():
                maps = stream_maps(mappers, features, resolution, size, p.distance)
            for name in STREAM_SPECS:
                w.append(name, maps[name].float().cpu().numpy().astype(dtype))
            stop = min(start + p.batch_size, n)
            w.append("fg", (np.asarray(fg_array[start:stop]) > 0).astype(np.uint8))
    return {"load_s": load_s}
