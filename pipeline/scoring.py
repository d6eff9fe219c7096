"""Anomaly maps from the four mappers (DESIGN 1.6).

Two halves:

- :func:`stream_maps` runs the mappers on one batch of test features and returns the four raw
  stream maps (1 - cos over the concatenated layers, at the mapper resolution, upsampled
  bilinearly to S);
- :func:`finish_maps` turns stored stream maps into the fused, masked, smoothed and normalised
  maps and image scores. ``evaluate`` calls it again for the fusion ablations, so it needs no
  mapper inference.

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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from scipy import ndimage
from torch.nn import functional as F

from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.models.mapper import ARCHITECTURES, Mapper, build_mapper, resize_layers
from pipeline.params import ScoreParams

STREAM_NAMES = ("psi2d_real", "psi2d_est", "psi3d_real", "psi3d_est")
BOX_PASSES = (5, 3)  # passes of the w_l box, then of the w_u box

# stream map -> (mapper, source modality, target modality). The estimated 2D->3D prediction
# is compared with the REAL normal features, as in the published code.
STREAM_SPECS: dict[str, tuple[str, str, str]] = {
    "psi2d_real": ("real_3d_to_2d", "real", "rgb"),
    "psi2d_est": ("est_3d_to_2d", "est", "rgb"),
    "psi3d_real": ("real_2d_to_3d", "rgb", "real"),
    "psi3d_est": ("est_2d_to_3d", "rgb", "real"),
}
MAPPER_NAMES = ("real_2d_to_3d", "real_3d_to_2d", "est_2d_to_3d", "est_3d_to_2d")


@dataclass(frozen=True)
class ScoredMaps:
    map: np.ndarray  # (B,S,S) float32, fused, masked, smoothed
    map_pro: np.ndarray  # (B,S,S) float32, map / mean(non-zero map)
    map_roc: np.ndarray  # (B,S,S) float32, map / sqrt(mean map)
    image_score: np.ndarray  # (B,) float32, max(map) / sqrt(mean of non-zero map)


# ----------------------------------------------------------------------------- mapper side
def cosine_distance(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - cos between the concatenated layers at each pixel: (B, H, W)."""
    return 1.0 - F.cosine_similarity(torch.cat(list(pred), dim=1), torch.cat(list(target), dim=1),
                                     dim=1)


def stream_maps(mappers: Mapping[str, Mapper], features: Mapping[str, Sequence[torch.Tensor]],
                resolution: int, size: int) -> dict[str, torch.Tensor]:
    """The four raw stream maps (B, size, size) of one batch.

    ``features`` maps ``rgb``/``real``/``est`` to the three layer tensors at their native grid.
    """
    at_res = {m: resize_layers(layers, resolution) for m, layers in features.items()}
    out = {}
    for name, (mapper, source, target) in STREAM_SPECS.items():
        d = cosine_distance(mappers[mapper](at_res[source]), at_res[target])[:, None]
        if d.shape[-1] != size or d.shape[-2] != size:
            d = F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
        out[name] = d[:, 0]
    return out


def _weights_look_like(state: Mapping[str, Any]) -> str:
    if any(k.startswith("attention.") for k in state):
        return "cahfm"
    if any(k.startswith("net.") for k in state):
        return "mlp"
    return "unknown"


def load_mappers(directory: Path, device: torch.device | None = None
                 ) -> tuple[dict[str, Any], dict[str, Mapper]]:
    """Read config.json and the four checkpoints; errors name the checkpoint and the config."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: mapper config not found (run the fit_mapper stage)")
    try:
        config = json.loads(config_path.read_text())
        architecture = config["architecture"]
        specs = config["mappers"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelError(f"{config_path}: not a valid mapper config ({err})") from None
    if architecture not in ARCHITECTURES:
        raise ModelError(f"{config_path}: unknown architecture {architecture!r} "
                         f"(allowed: {', '.join(ARCHITECTURES)})")
    mappers: dict[str, Mapper] = {}
    for name in MAPPER_NAMES:
        if name not in specs:
            raise ModelError(f"{config_path}: no entry for mapper {name!r}")
        spec = specs[name]
        path = directory / spec.get("file", f"{name}.safetensors")
        if not path.is_file():
            raise InputError(f"{path}: mapper checkpoint not found (listed in {config_path})")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{path}: cannot read checkpoint: {err}") from None
        mapper = build_mapper(architecture, spec["in_channels"], spec["out_channels"])
        try:
            mapper.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ModelError(
                f"{path}: weights do not fit the {architecture!r} mapper "
                f"{spec['in_channels']} -> {spec['out_channels']} described in {config_path} "
                f"(the weights look like {_weights_look_like(state)!r}; {first})"
            ) from None
        mappers[name] = mapper.to(device or torch.device("cpu")).eval()
    return config, mappers


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
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64))[:, None]
    for w, n in zip(sizes, passes):
        for _ in range(n):
            # count_include_pad=True: the border averages in zeros, i.e. zero padding.
            x = F.avg_pool2d(x, kernel_size=w, stride=1, padding=w // 2, count_include_pad=True)
    return x[:, 0].numpy()


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
