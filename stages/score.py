"""Stage ``score`` (category, k, seed): anomaly maps and image scores of the test set (DESIGN 1.6).

Reads   artifacts/features/<cat>/test.zarr, artifacts/mappers/<cat>/k<k>-s<seed>/,
        artifacts/prepare/<cat>/test.zarr (fg, attrs ids/labels)
Writes  artifacts/scores/<cat>/k<k>-s<seed>.zarr

The test set is streamed one batch (score.batch_size) at a time. The raw stream maps are
rounded to float16 (as stored) before fusion, so that ``evaluate`` re-fusing the stored streams
reproduces ``map`` exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.artifacts import StoreWriter, open_store, provenance, require_same_ids
from pipeline.device import pick_device
from pipeline.errors import InputError
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from pipeline.scoring import STREAM_NAMES, check_smoothing, finish_maps, load_mappers, stream_maps
from pipeline.training import FEATURE_KEYS, N_LAYERS, feature_meta, open_prepared_with_fg
from stages import layout

MODALITIES = ("rgb", "real", "est")
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


def run(params: Params, category: str, shots: int, seed: int = 0) -> None:
    p = params.score
    check_smoothing(p, category)
    mapper_dir = layout.mappers(category, shots, seed)
    device = pick_device()
    config, mappers = load_mappers(mapper_dir, device)
    resolution = int(config.get("resolution", 0))
    if resolution < 1:
        raise InputError(f"{mapper_dir / 'config.json'}: missing or invalid 'resolution'")

    feat_path = layout.features(category) / "test.zarr"
    feats = open_store(feat_path)
    meta = feature_meta(feats, MODALITIES)
    _check_matches(config, str(mapper_dir / "config.json"), meta, str(feat_path))

    prep_path = layout.prepared(category) / "test.zarr"
    prep, prep_ids = open_prepared_with_fg(prep_path, f"to score {feat_path}")
    require_same_ids(feat_path, meta.ids, prep_path, prep_ids)
    labels = [int(v) for v in prep.attrs.get("labels", [])]
    if len(labels) != len(prep_ids):
        raise InputError(f"{prep_path}: attribute 'labels' has {len(labels)} entries for "
                         f"{len(prep_ids)} samples")
    fg_array = prep["fg"]
    if fg_array.ndim != 3 or fg_array.shape[0] != len(prep_ids) or \
            fg_array.shape[1] != fg_array.shape[2]:
        raise InputError(f"{prep_path}: 'fg' has shape {tuple(fg_array.shape)}, expected "
                         f"({len(prep_ids)}, S, S)")
    size = int(fg_array.shape[1])
    n = len(meta.ids)

    attrs = {
        "ids": meta.ids,
        "labels": labels,
        "category": category,
        **provenance("score", section_dict(p), mappers=str(mapper_dir),
                     architecture=config["architecture"], resolution=resolution,
                     backbone=meta.backbone),
    }
    info(f"score {category} {layout.run_key(shots, seed)}: {n} test images on {device}")
    names = [f"{m}_{l}" for m in MODALITIES for l in range(N_LAYERS)]
    # Eight full-resolution map arrays: small shards keep the writer's buffer (one shard per
    # array) well below the model's memory, so peak memory does not grow with the test set.
    with StoreWriter(layout.scores(category, shots, seed), attrs=attrs, shard_bytes=MAP_SHARD_BYTES) as w:
        for name in STREAM_NAMES:
            w.create(name, n, (size, size), np.float16)
        w.create("fg", n, (size, size), np.uint8)
        for name in ("map", "map_pro", "map_roc"):
            w.create(name, n, (size, size), np.float32)
        w.create("image_score", n, (), np.float32)
        batches = feats.iter_batches(names, p.batch_size)
        total = -(-n // p.batch_size)
        for start, batch in zip(range(0, n, p.batch_size),
                                track(batches, f"score {category}", total=total)):
            features = {
                m: [torch.from_numpy(np.asarray(batch[f"{m}_{l}"], dtype=np.float32)).to(device)
                    for l in range(N_LAYERS)]
                for m in MODALITIES
            }
            with torch.inference_mode():
                maps = stream_maps(mappers, features, resolution, size)
            streams = {k: v.float().cpu().numpy().astype(np.float16) for k, v in maps.items()}
            fg = (np.asarray(fg_array[start:start + len(streams[STREAM_NAMES[0]])]) > 0)
            fg = fg.astype(np.uint8)
            scored = finish_maps(streams, fg, category, p)
            for name in STREAM_NAMES:
                w.append(name, streams[name])
            w.append("fg", fg)
            w.append("map", scored.map)
            w.append("map_pro", scored.map_pro)
            w.append("map_roc", scored.map_roc)
            w.append("image_score", scored.image_score)
