"""Decision thresholds from normal data, and the metrics of a thresholded decision.

A threshold turns a score into a decision: a sample (image score) or a pixel (anomaly map
value) is anomalous when its score is strictly above the threshold. The thresholds are fitted
on normal samples the model was not trained on (the dataset's validation split), never on the
test set:

- ``quantile``: the q-quantile of the normal scores (linear interpolation);
- ``max_margin``: the largest normal score times (1 + margin);
- a manual value (``thresholds.image`` / ``thresholds.pixel``) overrides the rule.

Pixel thresholds look at the foreground pixels of the normal samples' ``map_roc`` (the map
P-AUROC ranks, normalised per image); the background is zero by construction.

:func:`f1_optimal` is the threshold a look at the test labels would pick; it is reported
beside the fitted one as a reference only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import read_json
from pipeline.errors import InputError, ParamsError
from pipeline.params import ThresholdsParams

PIXEL_MAP = "map_roc"  # the map a pixel threshold applies to (see the module docstring)


@dataclass(frozen=True)
class NormalScores:
    """The scores of the normal samples a threshold is fitted on."""

    image: np.ndarray  # (N,) image scores
    pixel: np.ndarray  # (M,) foreground values of the N maps
    ids: list[str]


def normal_scores(ids: list[str], image_scores: Iterable[float],
                  maps: Iterable[np.ndarray], fgs: Iterable[np.ndarray]) -> NormalScores:
    """Collect the image scores and the foreground pixel values of normal samples."""
    pixels = [np.asarray(m, dtype=np.float32)[np.asarray(f) > 0] for m, f in zip(maps, fgs)]
    return NormalScores(np.asarray(list(image_scores), dtype=np.float64),
                        np.concatenate(pixels) if pixels else np.zeros(0, np.float32), ids)


def rule_threshold(values: np.ndarray, rule: str, quantile: float, margin: float) -> float:
    """The threshold of ``rule`` over normal scores ``values`` (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise InputError("no normal scores to fit a threshold on")
    if rule == "quantile":
        return float(np.quantile(values, quantile))
    if rule == "max_margin":
        return float(values.max() * (1.0 + margin))
    raise ParamsError(f"thresholds.rule: unknown rule {rule!r} (quantile, max_margin)")


def fit_thresholds(scores: NormalScores | None, params: ThresholdsParams) -> dict:
    """``{"image": {...}, "pixel": {...}}``: each with the threshold, how it was obtained and
    the normal scores' summary. ``scores`` may be None only when both are set by hand."""
    out = {}
    for level, manual, quantile in (("image", params.image, params.quantile),
                                    ("pixel", params.pixel, params.pixel_quantile)):
        values = None if scores is None else getattr(scores, level)
        entry: dict = {"n_normal": 0 if values is None else int(values.size)}
        if values is not None and values.size:
            entry.update(normal_max=float(values.max()), normal_mean=float(values.mean()))
        if manual is not None:
            entry.update(threshold=float(manual), source="manual")
        else:
            q = quantile if params.rule == "quantile" else None
            entry.update(threshold=rule_threshold(values, params.rule, quantile, params.margin),
                         source=params.rule, quantile=q,
                         margin=params.margin if params.rule == "max_margin" else None)
        out[level] = entry
    return out


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of ``score > threshold`` against 0/1 ``labels`` (null where
    undefined: no predicted positive for precision, no positive label for recall)."""
    predicted = np.asarray(scores) > threshold
    truth = np.asarray(labels) > 0
    tp = int(np.sum(predicted & truth))
    fp = int(np.sum(predicted & ~truth))
    fn = int(np.sum(~predicted & truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn}


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> dict:
    """The threshold of highest F1 over all cut points of ``score > threshold`` (each distinct
    score as the threshold, plus one below the smallest), with its metrics. Looks at the
    labels: a test-set reference, not a threshold to deploy."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = (np.asarray(labels) > 0).ravel()
    positives = int(truth.sum())
    if positives == 0:
        return binary_metrics(scores, truth, float(scores.max()) if scores.size else 0.0)
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    last = np.r_[s[1:] != s[:-1], True]  # the last index of each run of equal scores
    tp, fp, cut = tp[last], fp[last], s[last]
    f1 = 2 * tp / (tp + fp + positives)
    best = int(np.argmax(f1))
    end = int(np.nonzero(last)[0][best])  # the cut selects s[:end + 1]
    # a threshold between this cut's score and the next lower one, so that
    # ``score > threshold`` selects exactly this cut
    if end + 1 < len(s):
        threshold = (cut[best] + s[end + 1]) / 2
    else:
        threshold = np.nextafter(cut[best], -np.inf)
    return binary_metrics(scores, truth, float(threshold))


def read_thresholds(path: Path) -> tuple[float, float]:
    """(image, pixel) thresholds of a file written by the ``thresholds`` stage."""
    table = read_json(path, "thresholds not found (made by the thresholds stage: `dvc repro`, "
                            "or `cmds-ad thresholds CATEGORY --shots K --seed S`)")
    try:
        values = float(table["image"]["threshold"]), float(table["pixel"]["threshold"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a thresholds file ({type(err).__name__}: {err})") from None
    if not all(np.isfinite(values)):
        raise InputError(f"{path}: thresholds must be finite numbers, got {values}")
    return values


def thresholded_metrics(image_scores: np.ndarray, labels: np.ndarray, pixel_maps: np.ndarray,
                        gt: np.ndarray | None, thresholds: tuple[float, float]) -> dict:
    """metrics.json's entries: precision, recall and F1 at the fitted thresholds, and beside
    them the test set's F1-optimal thresholds, named as the reference they are. Without
    masks (``gt`` None) the pixel entries are null."""
    image_t, pixel_t = thresholds
    return {
        "at_threshold": {
            "image": binary_metrics(image_scores, labels, image_t),
            "pixel": None if gt is None else binary_metrics(pixel_maps, gt, pixel_t)},
        "test_reference_f1_optimal": {
            "image": f1_optimal(image_scores, labels),
            "pixel": None if gt is None else f1_optimal(pixel_maps, gt)},
    }
