"""Stage ``score`` (category, k, seed): fused anomaly maps and image scores (DESIGN 1.6).

Reads   artifacts/streams/<cat>/k<k>-s<seed>.zarr (the four stream maps and fg from ``infer``)
Writes  artifacts/scores/<cat>/k<k>-s<seed>.zarr: map, map_pro, map_roc (N, S, S) float32,
        image_score (N,) float32; attrs ids, labels, category

Fusion with the lambdas, foreground masking, smoothing and the per-image normalisations, on the
stored stream maps with numpy and scipy only: this stage imports neither torch nor the
mappers, so a change of a ``score`` parameter costs seconds. Streamed one batch
(score.batch_size) at a time.
"""

from __future__ import annotations

import numpy as np

from pipeline.artifacts import StoreWriter, provenance
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from pipeline.scoring import STREAM_NAMES, finish_maps
from pipeline.streams import open_streams
from stages import layout

MAP_SHARD_BYTES = 4 * 2**20  # four full-resolution map arrays; see stages.infer


def run(params: Params, category: str, shots: int, seed: int = 0) -> None:
    p = params.score
    streams_path = layout.streams(category, shots, seed)
    streams, ids, labels, size = open_streams(streams_path)
    n = len(ids)
    attrs = {
        "ids": ids,
        "labels": labels,
        "category": category,
        **provenance("score", section_dict(p), streams=str(streams_path)),
    }
    info(f"score {category} {layout.run_key(shots, seed)}: {n} test images")
    with StoreWriter(layout.scores(category, shots, seed), attrs=attrs,
                     shard_bytes=MAP_SHARD_BYTES) as w:
        for name in ("map", "map_pro", "map_roc"):
            w.create(name, n, (size, size), np.float32)
        w.create("image_score", n, (), np.float32)
        starts = range(0, n, p.batch_size)
        for start in track(starts, f"score {category}", total=len(starts)):
            stop = min(n, start + p.batch_size)
            batch = {name: np.asarray(streams[name][start:stop]) for name in STREAM_NAMES}
            scored = finish_maps(batch, np.asarray(streams["fg"][start:stop]), category, p)
            w.append("map", scored.map)
            w.append("map_pro", scored.map_pro)
            w.append("map_roc", scored.map_roc)
            w.append("image_score", scored.image_score)
