"""Stage ``fit_mapper`` (category, k, seed): train the four cross-modal mappers (DESIGN 1.5).

Reads   artifacts/features/<cat>/train.zarr, artifacts/prepare/<cat>/{shots.json,train.zarr},
        artifacts/features_generated/<cat>/k<k>-s<seed>.zarr; with fit_mapper.noise online
        also the images: artifacts/normals/<cat>/train.zarr, artifacts/augment/<cat>/k<k>-s<seed>/
        generated.zarr, artifacts/normals_generated/<cat>/k<k>-s<seed>.zarr (and the backbone)
Writes  artifacts/mappers/<cat>/k<k>-s<seed>/{real,est}_{2d_to_3d,3d_to_2d}.safetensors,
        config.json; results/loss/<cat>/k<k>-s<seed>.csv (columns step and one per mapper)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.artifacts import atomic_dir, atomic_write_json, atomic_write_text, open_store, \
    provenance
from pipeline.device import pick_device
from pipeline.models.mapper import Mapper
from pipeline.errors import InputError
from pipeline.params import ROUTE_KEYS, FitMapperParams, Params, section_dict
from pipeline.progress import info
from pipeline.training import (
    DIRECTIONS,
    FeatureMeta,
    OnlineNoise,
    StreamData,
    StreamResult,
    TrainConfig,
    check_same_features,
    derive_seed,
    feature_meta,
    modality_copies,
    open_prepared_with_fg,
    read_rows,
    resize_mask,
    rows_of,
    train_stream,
)
from stages import layout

STREAMS = {"real": 0, "est": 1}


def mapper_name(stream: str, direction: str) -> str:
    return f"{stream}_{direction}"


def train_config(p: FitMapperParams, steps: int) -> TrainConfig:
    """The training settings of ``fit_mapper`` for ``steps`` steps (benchmarks use it too)."""
    return TrainConfig(p.architecture, p.resolution, steps, p.lr, p.lr_min, p.weight_decay,
                       tuple(p.layer_weights), p.batch_size, p.noise_on)


def _shot_masks(category: str, shot_ids: list[str], resolution: int, why: str) -> np.ndarray:
    """The shots' foreground masks at the mappers' resolution (the real stream's loss region);
    every shot must keep some foreground."""
    prep_path = layout.prepared(category) / "train.zarr"
    prep, prep_ids = open_prepared_with_fg(prep_path, why)
    fg = read_rows(prep, "fg", rows_of(prep_path, prep_ids, shot_ids,
                                       str(layout.shots_file(category))))
    masks = resize_mask(fg, resolution)
    empty = [sid for sid, m in zip(shot_ids, masks) if not m.any()]
    if empty:
        raise InputError(f"{prep_path}: shots {empty} have no foreground pixels at "
                         f"fit_mapper.resolution={resolution}")
    return masks


def _mapper_folder_config(p: FitMapperParams, category: str, shots: int, seed: int,
                          results: dict, meta: Any, shot_ids: list[str], train_path: Path,
                          gen_path: Path, gen_ids: list[str]) -> dict[str, Any]:
    """``config.json`` of the mapper folder: each mapper's file, sides and sizes, the features
    they were trained on, provenance."""
    mappers_cfg = {}
    for stream, result in results.items():
        for direction in DIRECTIONS:
            m = result.mappers[direction]
            src, tgt = ("rgb", stream) if direction == "2d_to_3d" else (stream, "rgb")
            mappers_cfg[mapper_name(stream, direction)] = {
                "file": f"{mapper_name(stream, direction)}.safetensors",
                "source": src, "target": tgt,
                "in_channels": m.in_channels, "out_channels": m.out_channels, "width": m.width,
            }
    return {
        "architecture": p.architecture, "category": category, "shots": shots, "seed": seed,
        "resolution": p.resolution, "backbone": meta.backbone, "grid": meta.grid,
        "channels": meta.channels, "layers": meta.layers,
        "backbone_source": meta.backbone_source, "mappers": mappers_cfg, "shot_ids": shot_ids,
        "feature_stores": {
            "train": {"path": str(train_path), "ids": shot_ids},
            "generated": {"path": str(gen_path), "ids": gen_ids},
        },
        "provenance": provenance("fit_mapper", _recorded(p, ROUTE_KEYS)),
    }


def _loss_csv(results: dict, steps: int) -> str:
    """Wide format, one column per mapper: dvc.yaml plots x=step against the four columns."""
    names = [(s, d) for s in STREAMS for d in DIRECTIONS]
    lines = ["step," + ",".join(mapper_name(s, d) for s, d in names)]
    for step in range(steps):
        lines.append(f"{step}," + ",".join(f"{results[s].losses[d][step]:.6g}" for s, d in names))
    return "\n".join(lines) + "\n"


def _write_mappers(folder: Path, results: dict, architecture: str, config: dict) -> None:
    with atomic_dir(folder) as tmp:
        for stream, result in results.items():
            for direction in DIRECTIONS:
                state = {k: v.detach().cpu().contiguous()
                         for k, v in result.mappers[direction].state_dict().items()}
                save_file(state, str(tmp / f"{mapper_name(stream, direction)}.safetensors"),
                          metadata={"architecture": architecture})
        atomic_write_json(tmp / "config.json", config)


@dataclass
class Trained:
    """The four trained mappers of one (category, k, seed) and what they were trained on."""

    results: dict[str, StreamResult]  # stream -> its two mappers and loss curves
    meta: FeatureMeta  # the shots' feature store
    shot_ids: list[str]
    train_path: Path
    gen_path: Path
    gen_ids: list[str]
    steps: int

    def mappers(self) -> dict[str, Mapper]:
        """Mapper name (``real_2d_to_3d``, ...) -> its module, in eval mode (as ``infer``)."""
        return {mapper_name(stream, direction): result.mappers[direction].eval()
                for stream, result in self.results.items() for direction in DIRECTIONS}


def generated_source(gen_id: str) -> str:
    """The shot a generated image was made from: its id is ``gen/<shot id>/<j>``."""
    return gen_id[len("gen/"):].rsplit("/", 1)[0]


def train_mappers(params: Params, category: str, shots: int, seed: int,
                  left_out: str | None = None) -> Trained:
    """Train the four mappers of (category, k, seed) on the shots and their generated images;
    ``left_out``: a shot that, with the images generated from it, is left out of training
    (the leave-one-out thresholds of ``validation_streams``), all else unchanged."""
    p = params.fit_mapper
    steps = p.steps_for(shots)
    # 1. The shots' features (and masks) and the generated images' features, checked
    shot_ids = [s for s in layout.read_shot_ids(category, shots, seed) if s != left_out]
    train_path = layout.features(category) / "train.zarr"
    train = open_store(train_path)
    meta = feature_meta(train, ("rgb", "real", "est"))
    rows = rows_of(train_path, meta.ids, shot_ids, str(layout.shots_file(category)))
    masks = _shot_masks(category, shot_ids, p.resolution,
                        f"for the real-stream loss of {train_path}")
    gen_path = layout.features_generated(category, shots, seed)
    gen = open_store(gen_path)
    gen_meta = feature_meta(gen, ("rgb", "est"))
    check_same_features(meta, str(train_path), gen_meta)
    gen_rows = [i for i, g in enumerate(gen_meta.ids) if generated_source(g) != left_out]
    gen_ids = [gen_meta.ids[i] for i in gen_rows]
    # 2. The training pairs of each stream: real = shots, est = shots + generated
    online = p.noise == "online"
    data = {stream: _stream_data(stream, train, rows, gen, gen_rows, masks if stream == "real"
                                 else None, clean_targets=p.noise_on == "source" and not online)
            for stream in STREAMS}
    if online:  # fresh noise through the backbone every step (the stored features: targets)
        _add_online_noise(params, data, meta, category, shots, seed, shot_ids, gen_ids)
    config = train_config(p, steps)
    device = pick_device()
    without = "" if left_out is None else f" without {left_out}"
    info(f"fit_mapper {category} {layout.run_key(shots, seed)}{without}: {p.architecture}, "
         f"{steps} steps, {len(shot_ids)} shots + {len(gen_rows)} generated, on {device}")
    # 3. Train the two mappers of each stream
    results = {
        stream: train_stream(data[stream], config, derive_seed(p.seed, seed, index), device,
                             description=f"fit {stream} mappers {category} k{shots}{without}")
        for stream, index in STREAMS.items()
    }
    return Trained(results, meta, shot_ids, train_path, gen_path, gen_ids, steps)


def run(params: Params, category: str, shots: int, seed: int = 0) -> None:
    p = params.fit_mapper
    if p.mappers == "official":
        run_official(params, category, shots, seed)
        return
    trained = train_mappers(params, category, shots, seed)
    # The loss curves and the mapper folder
    atomic_write_text(layout.loss_curve(category, shots, seed),
                      _loss_csv(trained.results, trained.steps))
    _write_mappers(layout.mappers(category, shots, seed), trained.results, p.architecture,
                   _mapper_folder_config(p, category, shots, seed, trained.results, trained.meta,
                                         trained.shot_ids, trained.train_path, trained.gen_path,
                                         trained.gen_ids))


def _recorded(p: FitMapperParams, leave_out: tuple[str, ...]) -> dict:
    """The fit_mapper keys the instance's stage declares (upstream/dvc.yaml), for provenance."""
    return {k: v for k, v in section_dict(p).items() if k not in leave_out}


def run_official(params: Params, category: str, shots: int, seed: int) -> None:
    """fit_mapper.mappers = official: convert the released checkpoints instead of training."""
    from pipeline.official import check_features, import_official

    p = params.fit_mapper
    train_path = layout.features(category) / "train.zarr"
    meta = feature_meta(open_store(train_path), ("rgb", "real", "est"))
    features = {"backbone": meta.backbone, "backbone_source": meta.backbone_source,
                "layers": meta.layers, "grid": meta.grid, "channels": meta.channels}
    check_features({"channels": meta.channels, "grid": meta.grid}, meta, str(train_path))
    info(f"fit_mapper {category} {layout.run_key(shots, seed)}: converting the official "
         f"checkpoints under {p.checkpoints} (fit_mapper.mappers=official)")
    import_official(p.checkpoints, params.data.dataset, category, shots,
                    layout.mappers(category, shots, seed), features=features, seed=seed,
                    provenance=provenance("fit_mapper", _recorded(p, ROUTE_KEYS[2:])))
    # No training, no loss: the plot file DVC expects holds the header only.
    header = "step," + ",".join(mapper_name(s, d) for s in STREAMS for d in DIRECTIONS)
    atomic_write_text(layout.loss_curve(category, shots, seed), header + "\n")


def _images(path: Path, array: str, kind: str, ids: list[str], wanted_from: str) -> torch.Tensor:
    """The images ``ids`` of one store array as (N, 3, H, W) float32 in [0, 1]."""
    from pipeline.features import to_input

    store = open_store(path)
    if array not in store:
        raise InputError(f"{path}: no array {array!r} (needed by fit_mapper.noise: online)")
    rows = rows_of(path, [str(i) for i in store.attrs.get("ids", [])], ids, wanted_from)
    return to_input(read_rows(store, array, rows), kind, f"{path}/{array}")


def _add_online_noise(params: Params, data: dict[str, StreamData], meta, category: str,
                      shots: int, seed: int, shot_ids: list[str], gen_ids: list[str]) -> None:
    """fit_mapper.noise = online: fresh noise every step through the frozen backbone that made
    the stored features (the published training; the stored features stay the clean targets)."""
    from pipeline.features import encode_tensors
    from pipeline.models.backbones import frozen_backbone

    sec = params.extract_features
    backbone = frozen_backbone(params.models.backbone, sec.layers, sec.precision, pick_device(),
                               params.models.cache_dir)
    made_by = {"backbone": backbone.name, "layers": backbone.layers,
               "backbone_source": backbone.source}
    for key, value in made_by.items():
        if getattr(meta, key) != value:
            raise InputError(f"{meta.path}: feature {key} {getattr(meta, key)!r} is not that of "
                             f"the configured backbone ({value!r}), which fit_mapper.noise: "
                             "online runs; re-run extract_features")
    shots_from = str(layout.shots_file(category))
    prepared = layout.prepared(category) / "train.zarr"
    rgb = _images(prepared, "rgb", "rgb", shot_ids, shots_from)
    gen_from = str(layout.features_generated(category, shots, seed))
    images = {
        "real": (rgb, _images(prepared, "normals", "normals", shot_ids, shots_from)),
        "est": (torch.cat([rgb, _images(layout.augmented(category, shots, seed) / "generated.zarr",
                                        "rgb", "rgb", gen_ids, gen_from)]),
                torch.cat([_images(layout.normals(category) / "train.zarr", "normals", "normals",
                                   shot_ids, shots_from),
                           _images(layout.normals_generated(category, shots, seed), "normals",
                                   "normals", gen_ids, gen_from)])),
    }

    def encode(x: torch.Tensor, kind: str, added: torch.Tensor | None) -> list[torch.Tensor]:
        return encode_tensors(backbone, x, kind, added, torch.float32)

    for stream, (stream_rgb, stream_normals) in images.items():
        data[stream].online = OnlineNoise(stream_rgb, stream_normals, encode, sec.noise_sigma,
                                          sec.noise_space)


def _stream_data(stream: str, train, rows, gen, gen_rows, masks, clean_targets: bool
                 ) -> StreamData:
    """The training pairs of one stream: real = shots only; est = shots + generated images."""
    def features(modality: str, noisy: bool = True) -> list[np.ndarray]:
        shots = modality_copies(train, modality, rows, noisy)
        if stream == "real":
            return shots
        return _concat(shots, modality_copies(gen, modality, gen_rows, noisy))

    normals = "real" if stream == "real" else "est"
    data = StreamData(features("rgb"), features(normals), masks)
    if clean_targets:  # the published placement: noise on the mapper's input only
        data.rgb_clean = features("rgb", noisy=False)
        data.normals_clean = features(normals, noisy=False)
    return data


def _concat(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Per layer, join shot and generated samples (their copy counts may differ)."""
    out = []
    for x, y in zip(a, b):
        if len(y) == 0:
            out.append(x)
            continue
        # A single clean copy is repeated to match noisy copies of the other store.
        copies = max(x.shape[1], y.shape[1]) if 1 in (x.shape[1], y.shape[1]) else \
            min(x.shape[1], y.shape[1])
        x = np.repeat(x, copies, axis=1) if x.shape[1] == 1 else x[:, :copies]
        y = np.repeat(y, copies, axis=1) if y.shape[1] == 1 else y[:, :copies]
        out.append(np.concatenate([x, y]))
    return out
