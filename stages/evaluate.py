"""Stage ``evaluate`` (category, k, seed): metrics, curves, heatmaps and fusion ablations
(DESIGN 1.7).

Reads   artifacts/scores/<cat>/k<k>-s<seed>.zarr (map, map_pro, map_roc, image_score),
        artifacts/streams/<cat>/k<k>-s<seed>.zarr (the four stream maps and fg, for the
        ablations), artifacts/thresholds/<cat>/k<k>-s<seed>.json (from ``thresholds``),
        artifacts/prepare/<cat>/test.zarr (gt, rgb; attrs ids, labels)
Writes  results/evaluate/<cat>/k<k>-s<seed>/ (atomically):
        metrics.json   flat dict for ``dvc metrics show``: i_auroc (from image_score),
                       p_auroc (from map_roc), aupro@<limit> (exact) and, from the same
                       sort, aupro@<limit>_thr<T> (the published approximation, for each T
                       in ``evaluate.aupro_thresholds``) from map_pro, category, shots, seed,
                       n_test, ...; an undefined metric is null, with its reason under
                       ``undefined``
                       at_threshold (nested): precision, recall and F1 of image scores and
                       map_roc pixels above the thresholds of the ``thresholds`` stage (fitted on
                       normal validation samples); test_reference_f1_optimal: the thresholds
                       of best F1 on this test set (they look at its labels: a reference, not
                       a threshold to use)
        roc.csv        fpr,tpr (image level)              } DVC plots
        pro.csv        fpr,pro (exact curve) up to the largest limit, at most 1000 points }
        heatmaps/<id>.png  overlays of ``map`` (common colour scale [0, max over the test set])
                       on the RGB image with the gt contour in white, for
                       ``evaluate.heatmaps_per_class`` good and defective images each, chosen
                       evenly over each class's score ranking from the highest score down
                       (see :func:`pipeline.report.choose_examples`)
        overview.png   those overlays, the ROC and PRO curves and the score histograms
        ablations.json fusion variants recomputed from the stored stream maps (no model):
                       {variant: metrics} for the variants in ``ABLATIONS`` (the same keys,
                       both AUPRO computations included)

Also ``metrics_command`` behind ``cmds-ad metrics FILE.npz``. ``evaluate.headline_aupro`` is
not read here (only the report chooses a headline), so changing it re-runs the report alone.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import metrics as M
from pipeline import report as R
from pipeline.ablations import ABLATIONS
from pipeline.artifacts import Store, atomic_dir, open_store, require_same_ids
from pipeline.errors import InputError
from pipeline.params import Params
from pipeline.progress import info, track
from pipeline.scoring import STREAM_NAMES, finish_maps
from pipeline.streams import open_streams
from pipeline.thresholds import read_thresholds, thresholded_metrics
from stages import layout

PRO_PLOT_POINTS = 1000
ABLATION_WORKERS = min(2, os.cpu_count() or 1)


# ------------------------------------------------------------------------ cmds-ad metrics


def metrics_command(file: Path, extra_thresholds: Sequence[int] = ()) -> None:
    """Print the metrics of the maps in an NPZ (anomaly_maps, gt, labels[, scores]) as JSON:
    the exact AUPRO, the published 99-threshold approximation and one more approximation for
    each count in ``extra_thresholds``."""
    file = Path(file)
    if not file.is_file():
        raise InputError(f"{file}: file not found")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{file}: not a readable .npz file ({err})") from None
    missing = [n for n in ("anomaly_maps", "gt", "labels") if n not in arrays]
    if missing:
        raise InputError(
            f"{file}: missing array(s) {', '.join(missing)} (has: {', '.join(sorted(arrays))})"
        )
    try:
        result = M.evaluate_maps(
            arrays["anomaly_maps"], arrays["gt"], arrays["labels"],
            scores=arrays.get("scores"),
            aupro_thresholds=(M.PUBLISHED_THRESHOLDS, *extra_thresholds),
        )
    except InputError as err:
        raise InputError(f"{file}: {err}") from None
    print(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------ the stage


def _read(store: Store, path: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = store[name]
    if tuple(array.shape) != shape:
        raise InputError(f"{path}: array {name!r} has shape {tuple(array.shape)}, expected {shape}")
    return np.asarray(array[:])


def _public(result: dict) -> dict:
    """Metric values for JSON: the undefined reasons only when there are any."""
    out = {k: v for k, v in result.items() if k != "undefined" and k != "n_images"}
    if result.get("undefined"):
        out["undefined"] = dict(result["undefined"])
    return out


def _variant_metrics(stored: dict[str, np.ndarray], path: Path, params: Params, category: str,
                     gt: np.ndarray, labels: np.ndarray, variant: str) -> dict:
    """Metrics of one fusion variant (``ABLATIONS``), scored in batches of score.batch_size."""
    variant_params = params.score.model_copy(update=ABLATIONS[variant])
    n, batch = gt.shape[0], params.score.batch_size
    map_pro = np.empty(gt.shape, dtype=np.float32)
    map_roc = np.empty(gt.shape, dtype=np.float32)
    image_score = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        batch_maps = {name: stored[name][start:stop] for name in STREAM_NAMES}
        scored = finish_maps(batch_maps, stored["fg"][start:stop], category, variant_params)
        map_pro[start:stop] = scored.map_pro
        map_roc[start:stop] = scored.map_roc
        image_score[start:stop] = scored.image_score
    try:
        result = M.evaluate(map_pro, gt, labels, scores=image_score, roc_maps=map_roc,
                            limits=params.evaluate.limits,
                            aupro_thresholds=params.evaluate.aupro_thresholds)
    except InputError as err:
        raise InputError(f"{path}: fusion variant {variant!r}: {err}") from None
    return {"score_update": ABLATIONS[variant], **_public(result.metrics)}


def _start_ablations(pool: ThreadPoolExecutor, streams: Store, path: Path, params: Params,
                     category: str, gt: np.ndarray, labels: np.ndarray,
                     configured: dict) -> dict[str, Future]:
    """Every fusion variant from the stored stream maps, computed on ``pool``.

    The stream maps are read once (float32 by default, infer.map_dtype); each running variant
    holds its own float32 maps. A variant equal to the configured ``score`` section reuses
    ``configured``, the metrics of the stored maps, which are the same numbers. scipy's filters
    and numpy's sorts release the GIL, so two variants run on two cores while the main thread
    draws the figures.
    """
    stored = {name: np.asarray(streams[name][:]) for name in (*STREAM_NAMES, "fg")}
    futures: dict[str, Future] = {}
    for variant, update in ABLATIONS.items():
        if params.score.model_copy(update=update) == params.score:
            futures[variant] = Future()
            futures[variant].set_result({"score_update": update, **configured})
        else:
            futures[variant] = pool.submit(_variant_metrics, stored, path, params, category, gt,
                                           labels, variant)
    return futures


@dataclass
class _Inputs:
    """One instance's test set, checked against its scores and streams."""

    scores_path: Path
    streams_path: Path
    test_path: Path
    scores: Store
    streams: Store
    test: Store
    ids: list[str]
    labels: np.ndarray        # (N,) int64
    gt: np.ndarray            # (N, S, S) uint8
    map_pro: np.ndarray       # (N, S, S)
    map_roc: np.ndarray       # (N, S, S)
    image_score: np.ndarray   # (N,) float64
    thresholds: tuple[float, float]  # (image, pixel), from the thresholds stage
    no_gt: list[str]          # defective samples without a mask: gt is all zero then


def _read_inputs(category: str, shots: int, seed: int) -> _Inputs:
    """The scores, streams and test stores of an instance: same ids, one label per sample,
    maps of the ground truth's size."""
    scores_path = layout.scores(category, shots, seed)
    streams_path = layout.streams(category, shots, seed)
    test_path = layout.prepared(category) / "test.zarr"
    scores, test = open_store(scores_path), open_store(test_path)
    ids, test_ids = scores.ids, test.ids
    require_same_ids(scores_path, ids, test_path, test_ids)
    streams, stream_ids, _, stream_size = open_streams(streams_path)
    thresholds = read_thresholds(layout.thresholds(category, shots, seed))
    require_same_ids(streams_path, stream_ids, test_path, test_ids)
    n = len(ids)
    if n == 0:
        raise InputError(f"{test_path}: empty test set, nothing to evaluate")
    labels = test.attrs.get("labels")
    if not isinstance(labels, list) or len(labels) != n:
        raise InputError(f"{test_path}: attribute 'labels' missing or not one per sample")
    gt_array = test["gt"]
    if gt_array.ndim != 3 or gt_array.shape[0] != n:
        raise InputError(f"{test_path}: 'gt' has shape {tuple(gt_array.shape)}, expected (N, S, S)")
    shape = tuple(int(v) for v in gt_array.shape)
    gt = (np.asarray(gt_array[:]) > 0).astype(np.uint8)
    no_gt = [str(i) for i in test.attrs.get("no_gt", [])]
    if no_gt:  # a defect without its mask would count as defect-free pixels: no pixel metrics
        gt[:] = 0
    map_pro = _read(scores, scores_path, "map_pro", shape)
    map_roc = _read(scores, scores_path, "map_roc", shape)
    image_score = _read(scores, scores_path, "image_score", (n,)).astype(np.float64)
    if tuple(scores["map"].shape) != shape:
        raise InputError(f"{scores_path}: array 'map' has shape {tuple(scores['map'].shape)}, "
                         f"expected {shape}")
    if (n, stream_size, stream_size) != shape:
        raise InputError(f"{streams_path}: stream maps are {stream_size} x {stream_size}, the "
                         f"ground truth in {test_path} is {shape[1]} x {shape[2]}")
    return _Inputs(scores_path, streams_path, test_path, scores, streams, test, ids,
                   np.asarray(labels, dtype=np.int64), gt, map_pro, map_roc, image_score,
                   thresholds, no_gt)


def _write_heatmaps(folder: Path, x: _Inputs, chosen: Sequence[int], batch_size: int
                    ) -> list[tuple[np.ndarray, str]]:
    """Overlays of the raw fused map of the ``chosen`` images, on one colour scale for the
    whole test set; returns them with their captions (for the overview)."""
    n, vmax = len(x.ids), 0.0
    for start in range(0, n, batch_size):
        vmax = max(vmax, float(np.max(x.scores["map"][start:start + batch_size])))
    folder.mkdir()
    examples = []
    for i in chosen:
        image = R.overlay(np.asarray(x.test["rgb"][i]), np.asarray(x.scores["map"][i]), x.gt[i],
                          vmax)
        R.write_bytes(folder / f"{R.safe_name(x.ids[i])}.png", R.png_bytes(image))
        kind = "good" if x.labels[i] == 0 else "defective"
        examples.append((image, f"{x.ids[i]} ({kind})\nscore {x.image_score[i]:.3g}"))
    return examples


def _thresholded(x: _Inputs) -> dict:
    """P/R/F1 at the fitted thresholds and the test set's F1-optimal ones (a reference);
    without every defect's mask the pixel entries are null and the reasons say why."""
    return thresholded_metrics(x.image_score, x.labels, x.map_roc, None if x.no_gt else x.gt,
                               x.thresholds)


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def run(params: Params, category: str, shots: int, seed: int = 0) -> None:
    p = params.evaluate
    # 1. The inputs, checked
    x = _read_inputs(category, shots, seed)
    n = len(x.ids)
    info(f"evaluate {category} {layout.run_key(shots, seed)}: {n} test images")
    # 2. The metrics of the configured maps
    try:
        ev = M.evaluate(x.map_pro, x.gt, x.labels, scores=x.image_score, roc_maps=x.map_roc,
                        limits=p.limits, aupro_thresholds=p.aupro_thresholds)
    except InputError as err:
        raise InputError(f"{x.scores_path} with {x.test_path}: {err}") from None
    metrics = {**_public(ev.metrics), "category": category, "shots": shots, "seed": seed,
               "n_test": n, **_thresholded(x)}
    if x.no_gt:
        note = (f"{len(x.no_gt)} defective test samples have no gt mask (first: {x.no_gt[0]}): "
                "pixel metrics skipped")
        metrics["undefined"] = {key: note if key != "i_auroc" else why
                                for key, why in metrics.get("undefined", {}).items()}
    x.map_roc = np.zeros(0)  # not needed any more: freed before the ablations
    chosen = R.choose_examples(x.image_score, x.labels, p.heatmaps_per_class)
    pro_limit = max(p.limits)
    roc_x, roc_y = ev.roc if ev.roc is not None else (np.zeros(0), np.zeros(0))
    pro_x, pro_y = ev.pro_plot(pro_limit, PRO_PLOT_POINTS)
    with ThreadPoolExecutor(max_workers=ABLATION_WORKERS) as pool, \
            atomic_dir(layout.evaluation(category, shots, seed)) as out:
        # 3. The fusion ablations start on helper threads
        pending = _start_ablations(pool, x.streams, x.streams_path, params, category, x.gt,
                                   x.labels, _public(ev.metrics))
        # 4. Heatmaps, the overview, the curves and metrics.json meanwhile
        examples = _write_heatmaps(out / "heatmaps", x, chosen, params.score.batch_size)
        text = R.metrics_text(ev.metrics, p.limits, p.aupro_thresholds)
        title = f"{category}  k={shots}  seed={seed}  ({n} test images)"
        R.write_bytes(out / "overview.png", R.overview_png(
            title, examples, ev.roc, (pro_x, pro_y), pro_limit, x.image_score, x.labels, text))
        R.write_bytes(out / "roc.csv", R.curve_csv(("fpr", "tpr"), roc_x, roc_y).encode())
        R.write_bytes(out / "pro.csv", R.curve_csv(("fpr", "pro"), pro_x, pro_y).encode())
        R.write_bytes(out / "metrics.json", _json_bytes(metrics))
        # 5. The ablations' metrics
        ablations = {variant: future.result()
                     for variant, future in track(pending.items(), f"ablations {category}",
                                                  total=len(pending))}
        R.write_bytes(out / "ablations.json", _json_bytes(ablations))
