"""Score samples with one trained (category, k, seed) model in one process, without DVC.

The same library calls as the stages, in their order: ``prepare`` (preprocessing, real
normals), ``estimate_normals`` (Marigold), ``extract_features`` (backbone), ``infer`` (the four
mappers) and ``score`` (fusion, masking, smoothing, normalisation). What the stages store in
half precision (real and estimated normals, features, stream maps) is rounded here the same
way, and every step runs in batches of its stage's batch size aligned as the stage aligns
them, so the maps of the dataset's test samples equal the ``score`` stage's stored maps.

>>> predictor = Predictor.load(params, "disc", Path("artifacts/mappers/disc/k1-s0"))
>>> for result in predictor.predict(refs):   # refs: pipeline.data.SampleRef, sorted ids
...     result.image_score, result.scored.map_roc

Estimated normals are seeded per sample from the sample id (``estimate_normals.seeding:
per_sample``): a sample's id (``<folder>/<stem>``) is part of its input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.data import RawSample, SampleRef, load_sample
from pipeline.data.preprocess import (
    RGB_PAD_VALUE,
    PreprocessConfig,
    pad_square,
    preprocess,
    real_normals,
)
from pipeline.device import inference_dtype, pick_device
from pipeline.errors import InputError, ModelError
from pipeline.features import encode, to_input
from pipeline.inference import STREAM_SPECS, load_mappers, stream_maps
from pipeline.models.backbones import Backbone, backbone_dtype, load_backbone
from pipeline.models.diffusion import ModelSource, demo_threads, load_marigold
from pipeline.normals_estimation import (
    PRECISION_DTYPES,
    MarigoldRun,
    image_seeds,
    predict_normals,
    resolve_resolution,
)
from pipeline.official import check_features
from pipeline.params import Params
from pipeline.progress import track
from pipeline.scoring import ScoredMaps, finish_maps

STEPS = ("read", "preprocess", "normals", "features", "mappers", "score")
MODALITIES = ("rgb", "real", "est")
# A chunk is the least common multiple of the stages' batch sizes, so every step's batches
# start where the stage's do; above this the largest batch size is used instead.
MAX_CHUNK = 64


@dataclass
class SampleResult:
    """One sample's prediction: maps at the working size S (as ``score`` stores them), its
    image score, and what is needed to show the map at the input's resolution."""

    ref: SampleRef
    scored: ScoredMaps  # arrays of one sample: map/map_pro/map_roc (S, S), image_score ()
    raw: RawSample
    seconds: float  # this sample's share of its chunk's wall time

    @property
    def image_score(self) -> float:
        return float(self.scored.image_score)


@dataclass
class StreamChunk:
    """The four stream maps (B, S, S) float16 and the foreground (B, S, S) uint8 of a chunk
    of samples, as ``infer`` stores them, with the samples as read."""

    refs: list[SampleRef]
    raws: list[RawSample]
    streams: dict[str, np.ndarray]
    fg: np.ndarray
    seconds: float  # wall time of the chunk so far


@dataclass
class _Chunk:
    """The per-step intermediate results of one chunk of samples."""

    refs: list[SampleRef]
    raws: list[RawSample] = field(default_factory=list)
    rgb: list[np.ndarray] = field(default_factory=list)  # (S, S, 3) uint8
    real: list[np.ndarray] = field(default_factory=list)  # (S, S, 3) float16, (n + 1) / 2
    fg: list[np.ndarray] = field(default_factory=list)  # (S, S) uint8


def to_input_resolution(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A square (S, S) map of the padded, resized sample back on its (height, width) pixels:
    resized bilinearly to the padded square's side, then the centred padding cut off (the
    inverse of ``pad_square`` + resize in :func:`pipeline.data.preprocess.preprocess`)."""
    side = max(height, width)
    x = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    top, left = (side - height) // 2, (side - width) // 2
    return x[0, 0, top:top + height, left:left + width].numpy().copy()


class Predictor:
    """The loaded models of one (category, k, seed) and the parameters of the prediction path
    (the ``data``, ``estimate_normals``, ``extract_features``, ``infer`` and ``score``
    sections, ``models.normals`` and ``models.backbone``)."""

    def __init__(self, params: Params, category: str, mapper_config: dict[str, Any],
                 mappers: dict[str, Any], backbone: Backbone, marigold: Any,
                 marigold_source: ModelSource, marigold_run: MarigoldRun,
                 device: torch.device) -> None:
        self.params = params
        self.category = category
        self.mapper_config = mapper_config
        self.mappers = mappers
        self.backbone = backbone
        self.marigold = marigold
        self.marigold_source = marigold_source
        self.marigold_run = marigold_run
        self.device = device
        self.feature_dtype = getattr(torch, params.extract_features.feature_dtype)
        self.preprocess_config = PreprocessConfig.from_params(params.data, category)
        self.seconds = dict.fromkeys(("load", *STEPS), 0.0)

    @classmethod
    def load(cls, params: Params, category: str, mapper_dir: Path,
             device: torch.device | None = None) -> Predictor:
        """Load the mappers of ``mapper_dir``, the backbone and Marigold; the mappers must
        have been trained on features of this backbone (``config.json``)."""
        started = time.perf_counter()
        device = device or pick_device()
        config, mappers = load_mappers(Path(mapper_dir), device)
        backbone = _load_backbone(params, device)
        _check_backbone(config, backbone, Path(mapper_dir) / "config.json", params.data.size)
        p = params.estimate_normals
        dtype = inference_dtype(device) if p.precision == "auto" else PRECISION_DTYPES[p.precision]
        pipe, source = load_marigold(params.models.normals, params.models.cache_dir, device, dtype)
        run = MarigoldRun.of(p, resolve_resolution(pipe, p.processing_resolution, source.spec))
        predictor = cls(params, category, config, mappers, backbone, pipe, source, run, device)
        predictor.seconds["load"] = time.perf_counter() - started
        return predictor

    def chunk_size(self) -> int:
        p = self.params
        sizes = (p.estimate_normals.batch_size, p.extract_features.batch_size,
                 p.infer.batch_size, p.score.batch_size)
        lcm = math.lcm(*sizes)
        return lcm if lcm <= MAX_CHUNK else max(sizes)

    def streams(self, refs: Sequence[SampleRef], description: str = "predict"
                ) -> Iterator[StreamChunk]:
        """The stream maps of ``refs`` in their order, one chunk at a time (memory stays
        flat): what ``infer`` stores for the test set."""
        size = self.chunk_size()
        starts = range(0, len(refs), size)
        for start in track(starts, description, total=len(starts)):
            yield self._chunk(list(refs[start:start + size]))

    def predict(self, refs: Sequence[SampleRef], description: str = "predict"
                ) -> Iterator[SampleResult]:
        """The scored maps of ``refs`` in their order: what ``score`` stores."""
        for chunk in self.streams(refs, description):
            started = time.perf_counter()
            with self._step("score"):
                scored = self._score(chunk.streams, chunk.fg)
            share = (chunk.seconds + time.perf_counter() - started) / len(chunk.refs)
            for i, (ref, raw) in enumerate(zip(chunk.refs, chunk.raws)):
                yield SampleResult(ref, ScoredMaps(scored.map[i], scored.map_pro[i],
                                                   scored.map_roc[i], scored.image_score[i]),
                                   raw, share)

    # ------------------------------------------------------------------------ the steps
    def _chunk(self, refs: list[SampleRef]) -> StreamChunk:
        started = time.perf_counter()
        chunk = _Chunk(refs)
        with self._step("read"):
            chunk.raws = [load_sample(ref, self.params.data.eyecandies_xyz) for ref in refs]
        with self._step("preprocess"):
            for ref, raw in zip(refs, chunk.raws):
                self._prepare(chunk, ref, raw)
        with self._step("normals"):
            estimated = self._estimated_normals(chunk)
        with self._step("features"):
            features = self._features(chunk, estimated)
        with self._step("mappers"):
            streams = self._streams(features)
        return StreamChunk(refs, chunk.raws, streams, np.stack(chunk.fg),
                           time.perf_counter() - started)

    def _step(self, name: str) -> _Timer:
        return _Timer(self.seconds, name, self.device)

    def _prepare(self, chunk: _Chunk, ref: SampleRef, raw: RawSample) -> None:
        """What ``prepare`` stores for a sample: rgb, real normals (float16) and fg at S."""
        prep = preprocess(raw.rgb, raw.xyz, raw.gt, self.preprocess_config, raw.background)
        if not prep.fg.any():
            raise InputError(f"{ref.geometry_path}: no object points left after plane removal "
                             "and clustering (check data.plane_distance, data.cluster_eps)")
        normals = real_normals(raw.xyz, prep, self.preprocess_config, raw.background)
        chunk.rgb.append(prep.rgb)
        chunk.real.append(normals.astype(np.float16))
        chunk.fg.append((prep.fg > 0).astype(np.uint8))

    def _estimated_normals(self, chunk: _Chunk) -> np.ndarray:
        """Marigold normals (B, S, S, 3) float16, batched as ``estimate_normals`` batches:
        ``batch_size`` images, a new batch where the image size changes (input: original)."""
        p = self.params.estimate_normals
        if p.input == "original":
            images = [pad_square(raw.rgb, RGB_PAD_VALUE) for raw in chunk.raws]
        else:
            images = chunk.rgb
        ids = [ref.id for ref in chunk.refs]
        out = []
        with demo_threads(self.device, self.marigold_source):
            for start, stop in _batches([len(image) for image in images], p.batch_size):
                seeds = image_seeds(p.seed, ids[start:stop], p.seeding)
                out.append(predict_normals(self.marigold, np.stack(images[start:stop]), seeds,
                                           self.marigold_run, self.params.data.size))
        return np.concatenate(out)

    def _features(self, chunk: _Chunk, estimated: np.ndarray) -> dict[str, list[np.ndarray]]:
        """The three layers of each modality (``extract_features.feature_dtype``), as
        ``extract_features`` stores them."""
        inputs = {"rgb": (np.stack(chunk.rgb), "rgb"), "real": (np.stack(chunk.real), "normals"),
                  "est": (estimated, "normals")}
        layers: dict[str, list[list[np.ndarray]]] = {m: [] for m in MODALITIES}
        size = len(chunk.refs)
        for start, stop in _batches([0] * size, self.params.extract_features.batch_size):
            for modality, (images, kind) in inputs.items():
                x = to_input(images[start:stop], kind, f"{modality} of {chunk.refs[start].id}")
                layers[modality].append(encode(self.backbone, x, kind, dtype=self.feature_dtype))
        return {m: [np.concatenate([batch[layer] for batch in per_batch])
                    for layer in range(len(per_batch[0]))]
                for m, per_batch in layers.items()}

    def _streams(self, features: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """The four stream maps (B, S, S) of ``infer.map_dtype``, as ``infer`` stores them."""
        p, size = self.params.infer, self.params.data.size
        resolution = int(self.mapper_config["resolution"])
        n = len(features["rgb"][0])
        out: dict[str, list[np.ndarray]] = {name: [] for name in STREAM_SPECS}
        for start, stop in _batches([0] * n, p.batch_size):
            batch = {m: [torch.from_numpy(np.asarray(layer[start:stop], dtype=np.float32))
                         .to(self.device) for layer in layers]
                     for m, layers in features.items()}
            with torch.inference_mode():
                maps = stream_maps(self.mappers, batch, resolution, size, p.distance)
            for name in STREAM_SPECS:
                out[name].append(maps[name].float().cpu().numpy().astype(p.map_dtype))
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def _score(self, streams: dict[str, np.ndarray], fg: np.ndarray) -> ScoredMaps:
        """Fused, masked, smoothed and normalised maps, as ``score`` computes them."""
        p = self.params.score
        parts = [finish_maps({k: v[a:b] for k, v in streams.items()}, fg[a:b], self.category, p)
                 for a, b in _batches([0] * len(fg), p.batch_size)]
        return ScoredMaps(*(np.concatenate([getattr(s, name) for s in parts])
                            for name in ("map", "map_pro", "map_roc", "image_score")))


class _Timer:
    """Adds the wall time of a ``with`` block to ``seconds[name]`` (CUDA synchronised)."""

    def __init__(self, seconds: dict[str, float], name: str, device: torch.device) -> None:
        self.seconds, self.name, self.device = seconds, name, device

    def __enter__(self) -> None:
        self._sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds[self.name] += time.perf_counter() - self.start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _batches(sides: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive batches of at most ``batch_size`` items of one side."""
    out, start = [], 0
    while start < len(sides):
        stop = start + 1
        while stop < len(sides) and stop - start < batch_size and sides[stop] == sides[start]:
            stop += 1
        out.append((start, stop))
        start = stop
    return out


def _load_backbone(params: Params, device: torch.device) -> Backbone:
    backbone = load_backbone(params.models.backbone, params.extract_features.layers,
                             cache_dir=params.models.cache_dir)
    return backbone.to(device=device,
                       dtype=backbone_dtype(params.extract_features.precision, device))


def _check_backbone(config: dict[str, Any], backbone: Backbone, config_path: Path,
                    size: int) -> None:
    """The mappers of ``config_path`` must have been trained on this backbone's features (or,
    imported from the released checkpoints, on the published backbone and layers)."""
    channels, grid = backbone.probe(size, size)
    found = {"backbone": backbone.name, "layers": list(backbone.layers), "grid": grid,
             "channels": channels}
    if "official" in config and config.get("backbone_source") is None:
        check_features(config, SimpleNamespace(**found), f"models.backbone {backbone.name!r}")
        return
    for key, value in found.items():
        if key in config and config[key] != value:
            raise ModelError(f"{config_path}: the mappers were trained on features with {key} "
                             f"{config[key]!r}, but models.backbone / extract_features give "
                             f"{value!r}")
