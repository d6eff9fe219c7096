"""The released CMDS-AD mapper checkpoints, converted into a mapper folder of this project.

The published code saves each mapper as a plain ``torch.save(state_dict)`` of its 768-wide
``HierarchicalGatedMapper`` (OFFICIAL.md, "Released checkpoints"):

    <root>/checkpoints/checkpoints_dual_2dto3d_<class>_<k>shot/model_{real,est}_2d23d_final.pth
    <root>/checkpoints/checkpoints_dual_3dto2d_<class>_<k>shot/model_{real,est}_3d22d_final.pth

(``checkpoints_eyecandies_dual_`` for Eyecandies; older archives name the folders
``..._2dto3d_new3_<class>_<k>shot``). Its modules are ours under other names, so a prefix rename
alone loads the weights strictly into :class:`~pipeline.models.mapper.CAHFM`. The result is the
folder ``fit_mapper`` writes (four ``<mapper>.safetensors`` + ``config.json``), which ``infer``
reads as it reads trained mappers.

Files from a cloud folder are untrusted: they are read with ``torch.load(weights_only=True)``
only, which refuses any pickle that would build other objects than tensors and plain
containers (so a ``__reduce__`` payload is rejected before it runs), and then must be a flat
dict of tensors with exactly the expected keys and shapes.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.artifacts import atomic_dir, atomic_write_json, file_sha256
from pipeline.errors import InputError, ModelError
from pipeline.models.mapper import CAHFM
from pipeline.params import OFFICIAL_SETUP

# Our mapper name -> (direction tag of the official folder, official file name).
OFFICIAL_FILES: dict[str, tuple[str, str]] = {
    "real_2d_to_3d": ("2dto3d", "model_real_2d23d_final.pth"),
    "est_2d_to_3d": ("2dto3d", "model_est_2d23d_final.pth"),
    "real_3d_to_2d": ("3dto2d", "model_real_3d22d_final.pth"),
    "est_3d_to_2d": ("3dto2d", "model_est_3d22d_final.pth"),
}
# Mapper name -> (source, target) modality, as fit_mapper records them.
MODALITIES: dict[str, tuple[str, str]] = {
    "real_2d_to_3d": ("rgb", "real"),
    "est_2d_to_3d": ("rgb", "est"),
    "real_3d_to_2d": ("real", "rgb"),
    "est_3d_to_2d": ("est", "rgb"),
}
# Official module prefix -> ours (the published class and CAHFM differ only in names).
RENAMES: tuple[tuple[str, str], ...] = (
    ("proc_l4.", "project.0."),
    ("proc_l7.", "project.1."),
    ("proc_l11.", "project.2."),
    ("coord_att.conv1.", "attention.encode."),
    ("coord_att.bn1.", "attention.norm."),
    ("coord_att.conv_h.", "attention.attend_h."),
    ("coord_att.conv_w.", "attention.attend_w."),
    ("spatial_selector.", "selector."),
    ("fusion_head.", "head."),
)
FIRST_KEY = "proc_l4.0.weight"  # its shape gives the widths: (D, C_in, 1, 1)


def folder_prefix(dataset: str) -> str:
    return "checkpoints_eyecandies_dual" if dataset == "eyecandies" else "checkpoints_dual"


def checkpoint_dirs(root: str | Path, dataset: str, category: str, shots: int) -> dict[str, Path]:
    """The 2dto3d and 3dto2d folders of one category and k under ``root`` (or its checkpoints/)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: checkpoint root not found (fit_mapper.checkpoints / CKPT_ROOT)")
    prefix = folder_prefix(dataset)
    found: dict[str, Path] = {}
    for tag in ("2dto3d", "3dto2d"):
        names = (f"{prefix}_{tag}_{category}_{shots}shot", f"{prefix}_{tag}_new3_{category}_{shots}shot")
        candidates = [base / name for base in (root / "checkpoints", root) for name in names]
        hit = next((c for c in candidates if c.is_dir()), None)
        if hit is None:
            raise InputError(
                f"{root / 'checkpoints' / names[0]}: checkpoint folder not found (also looked for "
                f"{names[0]} directly under {root} and the older name {names[1]})"
            )
        found[tag] = hit
    return found


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from an official ``.pth``; anything else is refused."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err).strip()
        first = next((line.strip() for line in text.splitlines() if "Unsupported" in line),
                     text.splitlines()[0] if text else type(err).__name__)
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives
            raise ModelError(f"{path}: cannot read checkpoint: not a torch.save archive, nor a "
                             f"plain pickled state dict (torch: {first})") from None
        raise ModelError(
            f"{path}: refused: not a plain state dict of tensors (the pickle asks for other "
            f"objects, which are never built from a downloaded file; torch: {first})"
        ) from None
    except Exception as err:  # not a torch file, truncated, ...
        raise ModelError(f"{path}: cannot read checkpoint: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: refused: holds a {type(obj).__name__}, not a plain state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path}: refused: not a plain state dict of tensors "
                         f"(entry {bad[0]!r} is a {type(obj[bad[0]]).__name__})")
    return obj


def rename_key(key: str) -> str | None:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def official_key(key: str) -> str:
    """Our CAHFM key -> the official name (for messages)."""
    for old, new in RENAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def convert_state(state: Mapping[str, torch.Tensor], path: Path
                  ) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """Official keys -> CAHFM keys, checked against the architecture; returns (state, in, out)."""
    if FIRST_KEY not in state:
        raise ModelError(f"{path}: key {FIRST_KEY!r} missing (not an official CMDS-AD mapper)")
    shape = tuple(state[FIRST_KEY].shape)
    if len(shape) != 4 or shape[2:] != (1, 1):
        raise ModelError(f"{path}: key {FIRST_KEY!r} has shape {shape}, expected (D, C, 1, 1)")
    width, c_in = int(shape[0]), int(shape[1])
    in_channels, out_channels = [c_in] * 3, [width] * 3
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in CAHFM(in_channels, out_channels).state_dict().items()}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = rename_key(key)
        if ours is None or ours not in expected:
            raise ModelError(f"{path}: unexpected key {key!r} (not in the official mapper layout)")
        if tuple(value.shape) != expected[ours]:
            raise ModelError(f"{path}: key {key!r} has shape {tuple(value.shape)}, expected "
                             f"{expected[ours]} for a mapper {c_in} -> 3 x {width}")
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise ModelError(f"{path}: key {key!r} holds NaN or infinite values")
            value = value.float()  # our mappers run in float32, as the published ones
        renamed[ours] = value.contiguous()
    missing = [official_key(k) for k in expected if k not in renamed]
    if missing:
        raise ModelError(f"{path}: key {missing[0]!r} missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return renamed, in_channels, out_channels



def import_official(root: str | Path, dataset: str, category: str, shots: int, out: str | Path,
                    *, features: Mapping[str, Any] | None = None, seed: int | None = None,
                    provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert the four official checkpoints of one category and k into the mapper folder ``out``.

    Every file is read and checked before anything is written, and ``out`` appears only when
    all of it is written. ``features``: backbone/backbone_source/layers/grid/channels of the
    feature store the mappers will run on (fit_mapper passes its train store's); without it
    the published setup is recorded and ``infer`` checks the store against that.
    """
    dirs = checkpoint_dirs(root, dataset, category, shots)
    states: dict[str, dict[str, torch.Tensor]] = {}
    specs: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for name, (tag, filename) in OFFICIAL_FILES.items():
        path = dirs[tag] / filename
        state, c_in, c_out = convert_state(read_checkpoint(path), path)
        states[name] = state
        source, target = MODALITIES[name]
        specs[name] = {"file": f"{name}.safetensors", "source": source, "target": target,
                       "in_channels": c_in, "out_channels": c_out, "width": c_out[0]}
        sources[name] = {"file": f"{dirs[tag].name}/{filename}", "sha256": file_sha256(path)}
    widths = {tuple(s["in_channels"] + s["out_channels"]) for s in specs.values()}
    if len(widths) != 1:
        raise ModelError(f"{root}: the four checkpoints of {category} k={shots} have different "
                         f"widths ({sorted(widths)})")
    channels = specs["real_2d_to_3d"]["out_channels"]
    feats = dict(features) if features is not None else {
        "backbone": OFFICIAL_SETUP["backbone"], "backbone_source": None,
        "layers": OFFICIAL_SETUP["layers"], "grid": [28, 28], "channels": channels,
    }
    if [int(c) for c in feats["channels"]] != channels:
        raise InputError(f"{root}: the checkpoints map {channels[0]}-wide layers but the features "
                         f"have widths {feats['channels']} (backbone {feats['backbone']!r})")
    config = {
        "architecture": "cahfm",
        "category": category,
        "shots": shots,
        "seed": seed,
        "resolution": OFFICIAL_SETUP["resolution"],
        **{k: feats[k] for k in ("backbone", "backbone_source", "layers", "grid", "channels")},
        "mappers": specs,
        "official": {"root": str(root), "dataset": dataset, "files": sources},
    }
    if provenance is not None:
        config["provenance"] = dict(provenance)
    with atomic_dir(out) as tmp:
        for name, state in states.items():
            # One metadata entry only: safetensors orders several at random (bytes would differ).
            save_file(state, str(tmp / f"{name}.safetensors"), metadata={"architecture": "cahfm"})
        atomic_write_json(tmp / "config.json", config)
    return config


def check_features(config: Mapping[str, Any], meta: Any, where: str) -> None:
    """Features for imported mappers: the published backbone and layers, the mappers' widths."""
    arch = str(meta.backbone).split("@")[0]
    if arch != OFFICIAL_SETUP["backbone"] or list(meta.layers or []) != OFFICIAL_SETUP["layers"]:
        raise InputError(
            f"{where}: features of backbone {meta.backbone!r} layers {meta.layers}, but the official "
            f"checkpoints need {OFFICIAL_SETUP['backbone']} blocks {OFFICIAL_SETUP['layers']} "
            "(models.backbone, extract_features.layers)"
        )
    if list(meta.channels) != list(config["channels"]) or list(meta.grid) != list(config["grid"]):
        raise InputError(f"{where}: feature widths {meta.channels} on grid {meta.grid} do not match "
                         f"{config['channels']} on {config['grid']} of the imported mappers")
