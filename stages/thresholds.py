"""Stage ``thresholds`` (category, k, seed): image and pixel decision thresholds fitted on
the scores of normal samples the model was not trained on (pipeline/thresholds.py): the
validation split's, or the shots' by leave-one-out (``thresholds.normal_samples``).

Reads   artifacts/validation_streams/<cat>/k<k>-s<seed>.zarr (from ``validation_streams``)
Writes  artifacts/thresholds/<cat>/k<k>-s<seed>.json::

            {"image": {"threshold", "source", "quantile", "margin", "n_normal",
                       "normal_max", "normal_mean"},
             "pixel": {... the same, over the foreground pixels of map_roc},
             "pixel_map": "map_roc", "normal_samples", "validation_ids": [...] (the normal
             samples' ids: validation samples or shots), "category", "shots", "seed"}

The stream maps are scored here as ``score`` scores the test set (numpy only), so a change of
a ``score`` or ``thresholds`` parameter re-runs this stage, ``evaluate`` and the report, and
no model. ``evaluate`` and ``cmds-ad predict`` read the file.
"""

from __future__ import annotations

import numpy as np

from pipeline.artifacts import atomic_write_json, provenance
from pipeline.errors import ParamsError
from pipeline.params import Params, section_dict
from pipeline.progress import info
from pipeline.scoring import STREAM_NAMES, finish_maps
from pipeline.streams import open_streams
from pipeline.thresholds import PIXEL_MAP, NormalScores, fit_thresholds, normal_scores
from stages import layout


def validation_scores(params: Params, category: str, shots: int, seed: int
                      ) -> NormalScores | None:
    """The image scores and foreground map values of the normal validation samples."""
    path = layout.validation_streams(category, shots, seed)
    streams, ids, labels, _ = open_streams(path)
    normal = [i for i, label in enumerate(labels) if label == 0]
    if not normal:
        return None
    image, maps, fgs = [], [], []
    batch = params.score.batch_size
    for start in range(0, len(normal), batch):
        rows = normal[start:start + batch]
        fg = np.asarray(streams["fg"][rows])
        scored = finish_maps({n: np.asarray(streams[n][rows]) for n in STREAM_NAMES}, fg,
                             category, params.score)
        image.extend(scored.image_score.tolist())
        maps.extend(getattr(scored, PIXEL_MAP))
        fgs.extend(fg)
    return normal_scores([ids[i] for i in normal], image, maps, fgs)


def run(params: Params, category: str, shots: int, seed: int = 0) -> None:
    p = params.thresholds
    scores = validation_scores(params, category, shots, seed)
    if scores is None and (p.image is None or p.pixel is None):
        split = f"{params.data.root}/{category} (data.dataset {params.data.dataset})"
        raise ParamsError(
            f"thresholds.rule: {p.rule!r} needs the scores of normal validation samples, but "
            f"{split} has no validation split with normal samples; add one (MVTec 3D-AD: "
            "validation/good), set thresholds.normal_samples: leave_one_out (k >= 2), or give "
            "both thresholds.image and thresholds.pixel by hand")
    fitted = fit_thresholds(scores, p)
    result = {**fitted, "pixel_map": PIXEL_MAP, "category": category, "shots": shots,
              "seed": seed, "normal_samples": p.normal_samples,
              "validation_ids": [] if scores is None else scores.ids,
              **provenance("thresholds", {"thresholds": section_dict(p),
                                          "score": section_dict(params.score)})}
    atomic_write_json(layout.thresholds(category, shots, seed), result)
    info(f"thresholds {category} {layout.run_key(shots, seed)}: image "
         f"{fitted['image']['threshold']:.4g}, pixel {fitted['pixel']['threshold']:.4g} "
         f"({fitted['image']['source']})")
