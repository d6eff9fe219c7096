"""Anomaly maps from the four stored stream maps (DESIGN 1.6, second half).

:func:`finish_maps` turns the raw stream maps (written by the ``infer`` stage, see
:mod:`pipeline.inference`) into the fused, masked, smoothed and normalised maps and image
scores. The ``score`` stage calls it once, ``evaluate`` once per fusion ablation. This module
needs numpy and scipy only: re-scoring after a ``score`` parameter change does not import torch.

Ablation switches of :class:`~pipeline.params.ScoreParams`:

- ``streams``: ``both`` -> Psi2D = Psi2D_R + lambda_1 Psi2D_E, Psi3D = Psi3D_R + lambda_2 Psi3D_E;
  ``real`` -> Psi2D = Psi2D_R, Psi3D = Psi3D_R (the _E terms are dropped);
  ``estimated`` -> Psi2D = Psi2D_E, Psi3D = Psi3D_E (only the _E terms, without the lambdas:
  a constant factor would only rescale a single-term map).
- ``modalities``: ``both`` fuses Psi2D and Psi3D with ``fusion`` (``product`` element-wise
  Psi2D * Psi3D, ``sum`` Psi2D + Psi3D, ``max`` element-wise maximum); ``2d`` -> Psi = Psi2D and
  ``3d`` -> Psi = Psi3D (``fusion`` is then unused).
Then Psi is zeroed outside the foreground, smoothed (box cascade or Gaussian, zero padding) and
normalised per image. Divisions are guarded: an all-zero map gives zero maps and score 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError, ParamsError
from pipeline.params import ScoreParams

STREAM_NAMES = ("psi2d_real", "psi2d_est", "psi3d_real", "psi3d_est")
BOX_PASSES = (5, 3)  # passes of the w_l box, then of the w_u box


@dataclass(frozen=True)
class ScoredMaps:
    map: np.ndarray  # (B,S,S) float32, fused, masked, smoothed
    map_pro: np.ndarray  # (B,S,S) float32, map / mean(non-zero map)
    map_roc: np.ndarray  # (B,S,S) float32, map / sqrt(mean map)
    image_score: np.ndarray  # (B,) float32, max(map) / sqrt(mean of non-zero map)


# -------------------------------------------------------------------------------- map side
def check_smoothing(params: ScoreParams, category: str) -> None:
    """Fail early (before any inference) on box sizes the cascade cannot centre."""
    if params.smoothing == "box":
        sizes = params.box_for(category)
        key = "score.box_sizes_large" if category in params.large_box_categories \
            else "score.box_sizes"
        if any(w < 1 or w % 2 == 0 for w in sizes):
            raise ParamsError(f"{key}: box sizes must be odd and positive (got {list(sizes)})")


def box_cascade(maps: np.ndarray, sizes: tuple[int, int],
                passes: tuple[int, int] = BOX_PASSES) -> np.ndarray:
    """Repeated box means over (B, S, S) with zero padding: passes[0] of sizes[0], then ..."""
    for w in sizes:
        if w < 1 or w % 2 == 0:
            raise ParamsError(f"score.box_sizes: box sizes must be odd and positive (got {sizes})")
    x = np.array(maps, dtype=np.float64)
    for w, n in zip(sizes, passes):
        for _ in range(n):
            # mode="constant": the border averages in zeros, i.e. zero padding.
            x = ndimage.uniform_filter(x, size=w, mode="constant", cval=0.0, axes=(1, 2))
    return x


def gaussian(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over each (S, S) map, zero padding, kernel truncated at 4 sigma."""
    return ndimage.gaussian_filter(np.asarray(maps, dtype=np.float64), sigma=sigma,
                                   mode="constant", cval=0.0, truncate=4.0, axes=(1, 2))


def combine_streams(streams: Mapping[str, np.ndarray], params: ScoreParams) -> np.ndarray:
    """Psi before masking and smoothing, per the ablation switches (module docstring)."""
    missing = [n for n in STREAM_NAMES if n not in streams]
    if missing:
        raise InputError(f"stream maps missing: {missing}")
    s = {n: np.asarray(streams[n], dtype=np.float64) for n in STREAM_NAMES}
    if params.streams == "both":
        psi2d = s["psi2d_real"] + params.lambda_1 * s["psi2d_est"]
        psi3d = s["psi3d_real"] + params.lambda_2 * s["psi3d_est"]
    elif params.streams == "real":
        psi2d, psi3d = s["psi2d_real"], s["psi3d_real"]
    else:
        psi2d, psi3d = s["psi2d_est"], s["psi3d_est"]
    if params.modalities == "2d":
        return psi2d
    if params.modalities == "3d":
        return psi3d
    if params.fusion == "product":
        return psi2d * psi3d
    if params.fusion == "sum":
        return psi2d + psi3d
    return np.maximum(psi2d, psi3d)


def normalise(maps: np.ndarray) -> ScoredMaps:
    """Per image: map_pro = map / mean(non-zero), map_roc = map / sqrt(mean), score."""
    maps = np.asarray(maps, dtype=np.float64)
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    nonzero = flat != 0
    count = nonzero.sum(axis=1)
    mean_nz = np.where(count > 0, flat.sum(axis=1) / np.maximum(count, 1), 0.0)
    mean_all = flat.mean(axis=1) if flat.shape[1] else np.zeros(b)
    safe_nz = np.where(mean_nz > 0, mean_nz, 1.0)[:, None, None]
    safe_all = np.where(mean_all > 0, mean_all, 1.0)[:, None, None]
    map_pro = np.where((mean_nz > 0)[:, None, None], maps / safe_nz, 0.0)
    map_roc = np.where((mean_all > 0)[:, None, None], maps / np.sqrt(safe_all), 0.0)
    peak = flat.max(axis=1) if flat.shape[1] else np.zeros(b)
    score = np.where(mean_nz > 0, peak / np.sqrt(np.where(mean_nz > 0, mean_nz, 1.0)), 0.0)
    return ScoredMaps(maps.astype(np.float32), map_pro.astype(np.float32),
                      map_roc.astype(np.float32), score.astype(np.float32))


def finish_maps(streams: Mapping[str, np.ndarray], fg: np.ndarray, category: str,
                params: ScoreParams) -> ScoredMaps:
    """Fuse the stream maps, zero outside fg, smooth, normalise (see the module docstring)."""
    psi = combine_streams(streams, params)
    fg = np.asarray(fg)
    if fg.shape != psi.shape:
        raise InputError(f"foreground mask shape {fg.shape} does not match the stream maps "
                         f"{psi.shape}")
    psi = np.where(fg > 0, psi, 0.0)
    check_smoothing(params, category)
    if params.smoothing == "box":
        psi = box_cascade(psi, params.box_for(category))
    else:
        psi = gaussian(psi, params.gaussian_sigma)
    return normalise(psi)
