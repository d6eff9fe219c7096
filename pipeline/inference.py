"""Mapper inference: the four raw stream maps of the test set (DESIGN 1.6, first half).

The ``infer`` stage runs this once per (category, k, seed) and stores the stream maps, so that
every ``score`` parameter (fusion weights, fusion rule, smoothing) and every ablation in
``evaluate`` works on stored maps with numpy alone (:mod:`pipeline.scoring`), without torch or
the mappers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn import functional as F

from pipeline.errors import InputError, ModelError
from pipeline.models.mapper import ARCHITECTURES, Mapper, build_mapper, resize_layers

# stream map -> (mapper, source modality, target modality). The estimated 2D->3D prediction
# is compared with the REAL normal features, as in the published code. The names are the ones
# pipeline.scoring.STREAM_NAMES reads (a test checks); not imported from there, so that infer
# does not depend on the scoring code (a scoring edit must not re-run the mappers).
STREAM_SPECS: dict[str, tuple[str, str, str]] = {
    "psi2d_real": ("real_3d_to_2d", "real", "rgb"),
    "psi2d_est": ("est_3d_to_2d", "est", "rgb"),
    "psi3d_real": ("real_2d_to_3d", "rgb", "real"),
    "psi3d_est": ("est_2d_to_3d", "rgb", "real"),
}
MAPPER_NAMES = ("real_2d_to_3d", "real_3d_to_2d", "est_2d_to_3d", "est_3d_to_2d")


DISTANCES = ("layerwise", "concatenated")


def cosine_distance(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                    distance: str = "layerwise") -> torch.Tensor:
    """d(pred, target) = 1 - cos over the concatenated layers at each pixel: (B, H, W).

    ``concatenated`` is the published code (OFFICIAL item 1): the mapper output and the target
    are each the concatenation of the three layers (3 x 768 = 2304 values per pixel for
    ViT-B/8), L2-normalised, and d = 1 - their dot product; cosine similarity is that dot
    product, so no separate normalisation is needed.
    ``layerwise`` unit-normalises each layer before concatenating, which makes d the mean of the
    per-layer cosine distances. The mappers are trained on exactly those (DESIGN 1.5 loss), so
    the norms of their predicted layers are never fitted and differ from the targets' by an
    order of magnitude; with ``concatenated`` the layer with the largest norm mismatch sets d,
    and d tracks the object's silhouette rather than its defects.
    """
    if distance == "layerwise":
        pred = [F.normalize(p, dim=1) for p in pred]
        target = [F.normalize(t, dim=1) for t in target]
    elif distance != "concatenated":
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return 1.0 - F.cosine_similarity(torch.cat(list(pred), dim=1), torch.cat(list(target), dim=1),
                                     dim=1)


def stream_maps(mappers: Mapping[str, Mapper], features: Mapping[str, Sequence[torch.Tensor]],
                resolution: int, size: int, distance: str = "layerwise") -> dict[str, torch.Tensor]:
    """The four raw stream maps (B, size, size) of one batch.

    ``features`` maps ``rgb``/``real``/``est`` to the three layer tensors at their native grid.
    """
    at_res = {m: resize_layers(layers, resolution) for m, layers in features.items()}
    out = {}
    for name, (mapper, source, target) in STREAM_SPECS.items():
        d = cosine_distance(mappers[mapper](at_res[source]), at_res[target], distance)[:, None]
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
