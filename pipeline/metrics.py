"""Anomaly detection metrics (DESIGN 1.7): I-AUROC, P-AUROC and AUPRO.

Everything here works on sorted arrays and counts with ``np.searchsorted`` so that the
exact AUPRO and the pixel AUROC together cost about one sort of the defect-free pixels:

* AUROC is the Mann-Whitney U statistic with ties counted half (the same number as
  sklearn's ``roc_auc_score``): for every positive score, the number of negatives below it
  plus half the number equal to it, from ``searchsorted`` left/right on the sorted negatives.
* The exact PRO curve visits pixels in decreasing score. Between two consecutive distinct
  defect-free scores only defect pixels move it, vertically, which adds no area; so the
  curve is a chain of segments, one per distinct defect-free score. Summing their trapezoids
  in closed form needs only, for every defect pixel, the number of defect-free pixels below
  it (the same two ``searchsorted`` counts as the AUROC), and one bisection per limit: no
  pass over the curve's points at all (:class:`ExactPro`).
* The published approximation (99 or 100 thresholds at quantiles of the defect-free scores,
  ``calculate_au_pro(..., num_thresholds=99)`` in CFM / CMDS-AD) is computed next to the exact
  value from the same sorted pixels: one ``searchsorted`` of its thresholds, no second sort.
  Its keys carry the threshold count: ``aupro@0.3`` is exact, ``aupro@0.3_thr99`` the
  approximation (:func:`aupro_key`).

A metric that the data leaves undefined (no good image, no defect pixel, ...) is ``None``
and its reason is recorded under ``"undefined"``; bad input raises :class:`InputError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError

DEFAULT_LIMITS: tuple[float, ...] = (0.3, 0.1, 0.05, 0.01)
# The published tables (CFM, CMDS-AD: calculate_au_pro(..., num_thresholds=99)).
PUBLISHED_THRESHOLDS = 99
DEFAULT_THRESHOLDS: tuple[int, ...] = (PUBLISHED_THRESHOLDS,)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def aupro_key(limit: float, thresholds: int | None = None) -> str:
    """The result key of AUPRO at an FPR limit: ``aupro@0.3`` for the exact curve,
    ``aupro@0.3_thr99`` for the approximation with 99 thresholds."""
    key = f"aupro@{float(limit)}"
    return key if thresholds is None else f"{key}_thr{int(thresholds)}"


def threshold_counts(aupro_thresholds: Sequence[int] | None) -> tuple[int, ...]:
    """The approximations' threshold counts, validated, duplicates dropped, order kept."""
    if aupro_thresholds is None:
        return ()
    if isinstance(aupro_thresholds, (int, np.integer)) or isinstance(aupro_thresholds, str):
        # the old single choice (the approximation *instead of* the exact value)
        raise InputError(f"aupro_thresholds: expected a list of threshold counts, e.g. [99], "
                         f"got {aupro_thresholds!r} (the exact AUPRO is always computed)")
    counts: list[int] = []
    for t in aupro_thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 2:
            raise InputError(f"aupro_thresholds: every count must be an integer >= 2, got {t!r}")
        if int(t) not in counts:
            counts.append(int(t))
    return tuple(counts)


# --------------------------------------------------------------------------------------
# AUROC by rank statistics


def auroc_sorted(neg_sorted: np.ndarray, pos: np.ndarray) -> float:
    """AUROC of positives against *ascending-sorted* negatives, ties counted half."""
    n_neg, n_pos = len(neg_sorted), len(pos)
    if n_neg == 0 or n_pos == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    # Sorted queries make searchsorted walk the negatives once instead of bisecting afresh.
    pos = np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, side="left").sum(dtype=np.int64)
    below_or_equal = np.searchsorted(neg_sorted, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(below_or_equal)) / (2.0 * n_neg * n_pos))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of ``scores`` for binary ``labels`` (1 = positive), ties counted half."""
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    return auroc_sorted(np.sort(scores[~labels]), scores[labels])


def roc_curve_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` with one point per distinct score, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="stable")  # image level: a handful of values
    s, y = scores[order], labels[order]
    last_of_tie = np.append(np.diff(s) != 0, True)
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.concatenate(([0.0], fp / n_neg))
    tpr = np.concatenate(([0.0], tp / n_pos))
    return fpr, tpr


# --------------------------------------------------------------------------------------
# Integration


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x ascending) from its start up to ``x_max``.

    The value at ``x_max`` is interpolated linearly between its two neighbours, as the
    official MVTec 3D-AD evaluation does.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if 0 < ins < len(x):
            x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y0 + y_at) * (x_max - x0)
    keep = x <= x_max
    xk, yk = x[keep], y[keep]
    return float(np.sum(0.5 * (yk[1:] + yk[:-1]) * np.diff(xk)) + correction)


# --------------------------------------------------------------------------------------
# Pixel statistics shared by P-AUROC and AUPRO


@dataclass
class PixelStats:
    """The defect-free pixels sorted, and the defect pixels sorted with their PRO weights.

    ``pos_tail[i]`` is the summed PRO weight of ``pos[i:]``: the PRO of a threshold ``t`` is
    ``pos_tail[searchsorted(pos, t)]`` (left for ``>= t``, right for ``> t``).
    ``below[i]`` / ``below_eq[i]`` count the defect-free pixels ``<`` / ``<=`` ``pos[i]``.
    """

    neg: np.ndarray  # ascending
    pos: np.ndarray  # ascending
    pos_w: np.ndarray  # float64 PRO weight of each defect pixel, in the order of pos
    pos_tail: np.ndarray  # float64, len(pos) + 1, pos_tail[-1] == 0
    n_regions: int
    below: np.ndarray  # int64, len(pos)
    below_eq: np.ndarray  # int64, len(pos)

    def pro_at_least(self, t: np.ndarray) -> np.ndarray:
        return np.minimum(self.pos_tail[np.searchsorted(self.pos, t, side="left")], 1.0)

    def pro_above(self, t: np.ndarray) -> np.ndarray:
        return np.minimum(self.pos_tail[np.searchsorted(self.pos, t, side="right")], 1.0)

    def auroc(self) -> float:
        """Pixel AUROC: Mann-Whitney U with ties counted half."""
        u2 = int(self.below.sum(dtype=np.int64)) + int(self.below_eq.sum(dtype=np.int64))
        return float(u2 / (2.0 * len(self.neg) * len(self.pos)))


def pixel_stats(maps: np.ndarray, gt: np.ndarray) -> PixelStats:
    """Split the pixels into sorted defect-free scores and weighted defect scores.

    Regions are the 8-connected components of each image's mask; a defect pixel of region
    ``r`` carries weight ``1 / (|r| * number of regions)``.
    """
    defect = gt > 0
    neg = maps[~defect]  # one copy of the defect-free scores, sorted in place
    neg.sort(kind="quicksort")
    pos_parts: list[np.ndarray] = []
    inv_size_parts: list[np.ndarray] = []
    n_regions = 0
    for i in np.flatnonzero(defect.reshape(len(defect), -1).any(axis=1)):
        labelled, count = ndimage.label(defect[i], structure=EIGHT_CONNECTED)
        in_region = labelled > 0
        lab = labelled[in_region]
        sizes = np.bincount(lab, minlength=count + 1)
        pos_parts.append(maps[i][in_region])
        inv_size_parts.append(1.0 / sizes[lab])
        n_regions += int(count)
    if pos_parts:
        pos = np.concatenate(pos_parts)
        weights = np.concatenate(inv_size_parts) / max(n_regions, 1)
        order = np.argsort(pos, kind="stable")  # defect pixels only, never all pixels
        pos = pos[order]
        weights = weights[order]
        pos_tail = np.zeros(len(pos) + 1, dtype=np.float64)
        pos_tail[:-1] = np.cumsum(weights[::-1])[::-1]
    else:
        pos = np.zeros(0, dtype=maps.dtype)
        weights = np.zeros(0, dtype=np.float64)
        pos_tail = np.zeros(1, dtype=np.float64)
    # Sorted queries: searchsorted walks the negatives once instead of bisecting afresh.
    below = np.searchsorted(neg, pos, side="left").astype(np.int64)
    below_eq = np.searchsorted(neg, pos, side="right").astype(np.int64)
    return PixelStats(neg=neg, pos=pos, pos_w=weights, pos_tail=pos_tail, n_regions=n_regions,
                      below=below, below_eq=below_eq)


@dataclass
class ExactPro:
    """The exact PRO curve (every distinct score a threshold), evaluated in closed form.

    Visiting scores in decreasing order, between two consecutive distinct defect-free scores
    only defect pixels move the curve, vertically, adding no area. So the curve is a chain of
    segments, one per distinct defect-free score ``v``, from ``(FPR(> v), PRO(> v))`` to
    ``(FPR(>= v), PRO(>= v))``. Summing the trapezoids of all segments above ``v`` and
    exchanging the sums, each defect pixel ``p > v`` (weight ``w``) contributes
    ``w * (#neg in (v, p] + #neg in (v, p)) / (2 * N_neg)``; the counts come from
    ``searchsorted`` of the defect pixels into the sorted negatives, done once.
    """

    stats: PixelStats

    def _crossing(self, fpr: np.ndarray) -> tuple[np.ndarray, ...]:
        """For each FPR in (0, 1]: the defect-free score ``v`` whose segment reaches it, the
        number of negatives ``<= v``, and the segment's end points ``x0, x1, y0, y1``."""
        neg, n = self.stats.neg, len(self.stats.neg)
        fpr = np.asarray(fpr, dtype=np.float64)
        # m = the least count of negatives with m / n >= fpr (guarding float rounding)
        m = np.ceil(fpr * n).astype(np.int64)
        m = np.where((m - 1) / n >= fpr, m - 1, m)
        m = np.where(m / n < fpr, m + 1, m)
        m = np.clip(m, 1, n)
        v = neg[n - m]
        n_lt = np.searchsorted(neg, v, side="left")
        n_le = np.searchsorted(neg, v, side="right")
        x0, x1 = (n - n_le) / n, (n - n_lt) / n
        y0, y1 = self.stats.pro_above(v), self.stats.pro_at_least(v)
        return v, n_le, x0, x1, y0, y1

    def area_to(self, limit: float) -> float:
        """Trapezoid area from FPR 0 to ``limit``, interpolating on the segment crossing it."""
        st = self.stats
        v, n_le, x0, x1, y0, y1 = (a[0] for a in self._crossing(np.array([limit])))
        n_le, x0, x1, y0, y1 = int(n_le), float(x0), float(x1), float(y0), float(y1)
        first = int(np.searchsorted(st.pos, v, side="right"))  # defect pixels > v
        counts = (st.below_eq[first:] - n_le) + (st.below[first:] - n_le)
        before = 0.5 * float(np.dot(st.pos_w[first:], counts)) / len(st.neg)
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        return before + 0.5 * (y0 + y_at) * (limit - x0)

    def sample(self, limit: float, n_points: int) -> tuple[np.ndarray, np.ndarray]:
        """``n_points`` points of the curve at equally spaced FPR in [0, limit] (for plots);
        at FPR 0 the PRO above every defect-free score."""
        grid = np.linspace(0.0, limit, n_points)
        _, _, x0, x1, y0, y1 = self._crossing(np.maximum(grid, 1e-300))
        y = y0 + (y1 - y0) * np.clip((grid - x0) / (x1 - x0), 0.0, 1.0)
        y[grid == 0] = self.stats.pro_above(self.stats.neg[-1:])[0]
        return grid, y


def approx_pro_curve(stats: PixelStats, n_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """The published approximation: thresholds at equally spaced quantiles of the
    defect-free scores; returns ``(fpr, pro)`` sorted by FPR, ending at (1, 1)."""
    neg = stats.neg
    n = len(neg)
    p = np.floor(np.linspace(0, n - 1, n_thresholds)).astype(np.int64)
    fpr = 1.0 - (p + 1) / n
    pro = stats.pro_above(neg[p])
    fpr = np.append(fpr, 1.0)
    pro = np.append(pro, 1.0)
    order = np.argsort(fpr, kind="stable")
    return fpr[order], pro[order]


# --------------------------------------------------------------------------------------
# Validation and the public entry point


def _as_maps(anomaly_maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(anomaly_maps)
    if maps.ndim != 3:
        raise InputError(f"anomaly_maps: expected shape (N, H, W), got {maps.shape}")
    if len(maps) == 0:
        raise InputError("anomaly_maps: empty set (no images to evaluate)")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    elif maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float32)  # float16: compare in a precision numpy sorts natively
    if not np.isfinite(maps).all():
        bad = np.flatnonzero(~np.isfinite(maps).reshape(len(maps), -1).all(axis=1))
        raise InputError(f"anomaly_maps: NaN or infinite values in image(s) {bad[:10].tolist()}")
    return np.ascontiguousarray(maps)


def _validate(
    maps: np.ndarray, gt: np.ndarray, labels: np.ndarray, scores: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    if gt.shape != maps.shape:
        raise InputError(f"gt: shape {gt.shape} does not match anomaly_maps {maps.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(maps),):
        raise InputError(f"labels: shape {labels.shape}, expected ({len(maps)},) as anomaly_maps")
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"labels: must be 0 (good) or 1 (defective), got {np.unique(labels)}")
    labels = labels.astype(np.int8)
    has_defect = (gt != 0).reshape(len(gt), -1).any(axis=1)
    wrong = np.flatnonzero(has_defect & (labels == 0))
    if len(wrong):
        raise InputError(
            f"labels: image(s) {wrong[:10].tolist()} labelled good (0) but gt marks defect pixels"
        )
    if scores is None:
        image_scores = maps.reshape(len(maps), -1).max(axis=1)
    else:
        image_scores = np.asarray(scores)
        if image_scores.shape != (len(maps),):
            raise InputError(
                f"scores: shape {image_scores.shape}, expected ({len(maps)},) as anomaly_maps"
            )
        if not np.issubdtype(image_scores.dtype, np.number):
            raise InputError(f"scores: expected numbers, got dtype {image_scores.dtype}")
        if not np.isfinite(image_scores).all():
            bad = np.flatnonzero(~np.isfinite(image_scores))
            raise InputError(f"scores: NaN or infinite image score(s) at {bad[:10].tolist()}")
    return gt, labels, image_scores


@dataclass
class Evaluation:
    """Metric values (``None`` where undefined, with reasons) and the curves behind them."""

    metrics: dict
    roc: tuple[np.ndarray, np.ndarray] | None  # image-level (fpr, tpr)
    pro: ExactPro | None  # the exact PRO curve (None where AUPRO is undefined)
    pro_points: dict[int, tuple[np.ndarray, np.ndarray]]  # approximate curves (fpr, pro) by T

    def pro_plot(self, limit: float, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """The exact PRO curve from FPR 0 to ``limit`` for a plot (at most ``max_points``)."""
        if self.pro is not None:
            return self.pro.sample(limit, max_points)
        return np.zeros(0), np.zeros(0)


def evaluate(
    anomaly_maps: np.ndarray,
    gt: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    limits: Sequence[float] = DEFAULT_LIMITS,
    aupro_thresholds: Sequence[int] | None = DEFAULT_THRESHOLDS,
    roc_maps: np.ndarray | None = None,
) -> Evaluation:
    """All metrics and the image ROC / PRO curves; see :func:`evaluate_maps`.

    ``roc_maps``, when given, are the maps P-AUROC is computed from (the pipeline scores
    pixels for P-AUROC and AUPRO with differently normalised maps, DESIGN 1.6); AUPRO and,
    when ``scores`` is None, the image scores use ``anomaly_maps``.
    """
    limits = [float(x) for x in limits]
    if not limits or any(not 0 < x <= 1 for x in limits):
        raise InputError(f"limits: every FPR limit must be in (0, 1], got {limits}")
    counts = threshold_counts(aupro_thresholds)
    maps = _as_maps(anomaly_maps)
    gt, labels, image_scores = _validate(maps, gt, labels, scores)
    if roc_maps is not None:
        roc_maps = _as_maps(roc_maps)
        if roc_maps.shape != maps.shape:
            raise InputError(
                f"roc_maps: shape {roc_maps.shape} does not match anomaly_maps {maps.shape}"
            )

    undefined: dict[str, str] = {}  # metric -> why it is None
    result: dict = {}
    roc = _image_metrics(image_scores, labels, result, undefined)
    pro, pro_points, n_regions = _pixel_metrics(maps, roc_maps, gt, limits, counts, result,
                                                undefined)
    result["aupro_thresholds"] = list(counts)
    result["n_images"] = len(maps)
    result["n_defective"] = int((labels == 1).sum())
    result["n_regions"] = n_regions
    result["undefined"] = undefined
    return Evaluation(metrics=result, roc=roc, pro=pro, pro_points=pro_points)


def _image_metrics(image_scores: np.ndarray, labels: np.ndarray, result: dict,
                   undefined: dict[str, str]) -> tuple[np.ndarray, np.ndarray] | None:
    """I-AUROC into ``result``; returns the image ROC curve (None without both classes)."""
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    if n_good and n_bad:
        result["i_auroc"] = auroc(image_scores, labels)
        return roc_curve_points(image_scores, labels)
    result["i_auroc"] = None
    missing = "good" if not n_good else "defective"
    undefined["i_auroc"] = f"no {missing} image in the set"
    return None


def _pixel_metrics(maps: np.ndarray, roc_maps: np.ndarray | None, gt: np.ndarray,
                   limits: list[float], counts: Sequence[int], result: dict,
                   undefined: dict[str, str]) -> tuple[ExactPro | None, dict, int]:
    """P-AUROC and every AUPRO into ``result``; returns the exact PRO curve, the approximate
    curves by threshold count and the number of defect regions."""
    stats = pixel_stats(maps, gt)
    n_neg, n_pos = len(stats.neg), len(stats.pos)
    why = "no defect pixel in gt" if not n_pos else "no defect-free pixel in gt"
    if n_neg and n_pos:
        roc_stats = stats if roc_maps is None else pixel_stats(roc_maps, gt)
        result["p_auroc"] = roc_stats.auroc()
        del roc_stats
    else:
        result["p_auroc"] = None
        undefined["p_auroc"] = why

    # The exact value and every approximation read the same sorted pixels (``stats``): an
    # approximation adds one searchsorted of its T thresholds, not a sort.
    pro, pro_points = None, {}
    if n_neg and n_pos:
        pro = ExactPro(stats)
        pro_points = {t: approx_pro_curve(stats, t) for t in counts}
    for limit in limits:
        for t in (None, *counts):
            key = aupro_key(limit, t)
            if pro is None:
                result[key] = None
                undefined[key] = why
            elif t is None:
                result[key] = pro.area_to(limit) / limit
            else:
                result[key] = trapezoid_to(*pro_points[t], limit) / limit
    return pro, pro_points, stats.n_regions


def evaluate_maps(anomaly_maps: np.ndarray, gt: np.ndarray, labels: np.ndarray,
                  scores: np.ndarray | None = None, **options: Any) -> dict:
    """I-AUROC, P-AUROC and AUPRO at each FPR limit of a set of anomaly maps.

    ``anomaly_maps`` (N, H, W) float; ``gt`` (N, H, W), non-zero = defect; ``labels`` (N,)
    0 good / 1 defective; ``scores`` (N,) image scores, default the max of each map.
    AUPRO is always computed on the exact PRO curve (``aupro@<limit>``) and, for every T in
    ``aupro_thresholds`` (default ``(99,)``, the published tables), with the published
    approximation of T thresholds (``aupro@<limit>_thr<T>``), from the same sort. Other keys:
    ``i_auroc``, ``p_auroc``, ``aupro_thresholds`` (the list of T), ``n_images``,
    ``n_defective``, ``n_regions`` and ``undefined`` (metric -> reason for every metric that
    is ``None``). ``options``: ``limits`` (default ``DEFAULT_LIMITS``) and
    ``aupro_thresholds``, as :func:`evaluate` takes them.
    """
    return evaluate(anomaly_maps, gt, labels, scores, **options).metrics
