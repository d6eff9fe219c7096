"""Frozen-backbone features of RGB and normal images, streamed store to store (DESIGN 1.4).

RGB (uint8) is scaled to [0, 1] and ImageNet-normalised; normal images (encoded (n + 1) / 2, in
[0, 1]) go to the same backbone as they are, without normalisation. Features are stored
(N, C_l, h, w) at the backbone's native grid, as float16 (half the store) or float32 (the
published training's precision, OFFICIAL 17): ``extract_features.feature_dtype``.

Work is streamed: a reader thread fetches the next batch from the input stores while the model
encodes the current one, and a writer thread appends the previous batch's features to the
output store, so reading, decompression and compression overlap the forward pass and memory
stays flat (at most one batch in each of the three places, plus the writer's shard buffer).

Optional noisy copies (published training adds Gaussian noise of std 0.01 to the mapper's input
image before encoding, fresh every step; OFFICIAL 10): ``copies`` extra encodings of each image
with noise of std ``sigma``, stored as ``noisy_<modality>_<l>`` (N, copies, C_l, h, w). For RGB
the noise goes where ``space`` says: ``normalised`` = after ImageNet normalisation (published),
``image`` = in [0, 1] before it; normal images are not normalised, so both are the same for
them. Which side of a mapper uses the copies (its source only, as published, or both) is the
trainer's choice (``fit_mapper.noise_on``). The noise of sample i depends only on (seed, store
tag, i, modality), not on the batch size.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.artifacts import Store, StoreWriter
from pipeline.background import BackgroundWriter, ReadAhead
from pipeline.errors import InputError, ModelError
from pipeline.models.backbones import Backbone
from pipeline.progress import track

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Kind = Literal["rgb", "normals"]
NoiseSpace = Literal["normalised", "image"]


@dataclass(frozen=True)
class Source:
    """One input modality: ``array`` of ``store``; ``modality`` prefixes the output arrays."""

    modality: str
    store: Store
    array: str
    kind: Kind


@dataclass(frozen=True)
class Noise:
    copies: int = 0
    sigma: float = 0.01
    seed: int = 0
    tag: str = ""  # distinguishes stores so sample i of two stores gets different noise
    space: NoiseSpace = "image"  # RGB: add after ImageNet normalisation, or in [0, 1] before


def check_sources(sources: Sequence[Source]) -> tuple[int, int, int]:
    """Validate ids, shapes and dtypes of the inputs before any work; return (N, H, W)."""
    first = sources[0]
    ids = first.store.ids
    shape: tuple[int, ...] | None = None
    for src in sources:
        path = src.store.path
        if src.store.ids != ids:
            raise InputError(
                f"sample ids differ between {first.store.path} and {path} "
                f"({len(ids)} vs {len(src.store.ids)} ids); re-run the stage that wrote {path}"
            )
        if src.array not in src.store:
            if not ids:
                continue  # an empty store may carry no arrays
            raise InputError(f"{path}: no array {src.array!r} (has: {', '.join(sorted(src.store.names()))})")
        arr = src.store[src.array]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"{path}/{src.array}: expected shape (N, H, W, 3), got {tuple(arr.shape)}")
        if arr.shape[0] != len(ids):
            raise InputError(f"{path}/{src.array}: {arr.shape[0]} images but {len(ids)} ids")
        if src.kind == "rgb" and arr.dtype != np.uint8:
            raise InputError(f"{path}/{src.array}: expected uint8 RGB, got {arr.dtype}")
        if src.kind == "normals" and not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"{path}/{src.array}: expected float normals in [0, 1], got {arr.dtype}")
        if shape is not None and tuple(arr.shape[1:3]) != shape:
            raise InputError(
                f"{path}/{src.array}: images are {arr.shape[1]}x{arr.shape[2]} but "
                f"{first.store.path} has {shape[0]}x{shape[1]}"
            )
        shape = tuple(int(s) for s in arr.shape[1:3])
    if shape is None:  # empty inputs: the size does not matter, probe at the usual one
        shape = (224, 224)
    return len(ids), shape[0], shape[1]


def to_input(batch: np.ndarray, kind: Kind, source: str) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB or float normals -> (B, 3, H, W) float32 in [0, 1]."""
    if kind == "rgb":
        x = torch.from_numpy(np.ascontiguousarray(batch)).float().div_(255.0)
    else:
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise InputError(f"{source}: normals contain NaN or infinite values")
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise InputError(f"{source}: normals outside [0, 1] (expected the encoding (n + 1) / 2)")
    return x.permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """ImageNet normalisation for RGB; normal images are fed unchanged."""
    if kind != "rgb":
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def sample_noise(noise: Noise, index: int, modality: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """The (copies, 3, H, W) noise of one sample and modality, from its own generator."""
    key = np.random.SeedSequence(
        [noise.seed, zlib.crc32(noise.tag.encode()), index, zlib.crc32(modality.encode())]
    ).generate_state(2, dtype=np.uint64)
    gen = torch.Generator().manual_seed(int(key[0] >> np.uint64(1)))
    return torch.randn((noise.copies, *shape), generator=gen) * noise.sigma


def encode_tensors(backbone: Backbone, x: torch.Tensor, kind: Kind,
                   added: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                   ) -> list[torch.Tensor]:
    """Three feature maps (B, C_l, h, w) of ``dtype`` of a [0, 1] image batch, on the
    backbone's device, without autograd (``no_grad``, not inference mode: a trainer may feed
    them to a module it trains).

    ``added`` (noise) is added to the backbone's input, i.e. after the normalisation.
    """
    p = next(backbone.parameters())
    with torch.no_grad():
        x = normalise(x.to(p.device, non_blocking=True).float(), kind)
        if added is not None:
            x = x + added.to(x.device, non_blocking=True).float()
        x = x.to(p.dtype)  # normalise (and add noise) in float32, then the backbone's precision
        maps = [m.to(dtype) for m in backbone(x)]
    if not all(bool(torch.isfinite(m).all()) for m in maps):
        raise ModelError(f"backbone {backbone.name!r}: non-finite features (overflow beyond {dtype}?)")
    return maps


@torch.inference_mode()
def encode(backbone: Backbone, x: torch.Tensor, kind: Kind, added: torch.Tensor | None = None,
           dtype: torch.dtype = torch.float16) -> list[np.ndarray]:
    """:func:`encode_tensors` as numpy arrays on the CPU."""
    return [m.cpu().numpy() for m in encode_tensors(backbone, x, kind, added, dtype)]


def output_arrays(
    sources: Sequence[Source], n: int, channels: Sequence[int], grid: Sequence[int], copies: int
) -> dict[str, tuple[int, ...]]:
    """Name -> per-sample shape of every output array."""
    shapes: dict[str, tuple[int, ...]] = {}
    for src in sources:
        for layer, c in enumerate(channels):
            shapes[f"{src.modality}_{layer}"] = (c, *grid)
    if copies:
        for src in sources:
            for layer, c in enumerate(channels):
                shapes[f"noisy_{src.modality}_{layer}"] = (copies, c, *grid)
    return shapes


def _read(sources: Sequence[Source], start: int, stop: int) -> dict[str, torch.Tensor]:
    out = {}
    for src in sources:
        where = f"{src.store.path}/{src.array} (samples {start}..{stop - 1})"
        try:
            batch = src.store[src.array][start:stop]
        except InputError:
            raise
        except Exception as err:  # damaged chunk
            raise InputError(f"{where}: cannot read: {err}") from None
        out[src.modality] = to_input(batch, src.kind, where)
    return out


def _encode_batch(
    backbone: Backbone, sources: Sequence[Source], images: Mapping[str, torch.Tensor], start: int, noise: Noise,
    dtype: torch.dtype = torch.float16,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for src in sources:
        x = images[src.modality]
        for layer, feat in enumerate(encode(backbone, x, src.kind, dtype=dtype)):
            out[f"{src.modality}_{layer}"] = feat
        if noise.copies:
            shape = tuple(x.shape[1:])
            eps = torch.stack([sample_noise(noise, start + i, src.modality, shape) for i in range(len(x))])
            if noise.space == "image":
                per_copy = [encode(backbone, x + eps[:, c], src.kind, dtype=dtype)
                            for c in range(noise.copies)]
            else:
                per_copy = [encode(backbone, x, src.kind, eps[:, c], dtype)
                            for c in range(noise.copies)]
            for layer in range(len(per_copy[0])):
                out[f"noisy_{src.modality}_{layer}"] = np.stack([f[layer] for f in per_copy], axis=1)
    return out


def _feature_attrs(backbone: Backbone, noise: Noise) -> dict[str, Any]:
    """The store attributes that say how the features were made (grid and channels follow)."""
    return {
        "backbone": backbone.name,
        "backbone_source": backbone.source,
        "layers": list(backbone.layers),
        "noisy_copies": noise.copies,
        "noise_sigma": noise.sigma if noise.copies else 0.0,
        "noise_space": noise.space,
    }


def extract_store(
    backbone: Backbone,
    sources: Sequence[Source],
    out_path: str | Path,
    attrs: Mapping[str, Any],
    *,
    batch_size: int,
    noise: Noise | None = None,
    description: str = "features",
    stats: dict[str, float] | None = None,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Encode every image of ``sources`` and write the feature store ``out_path`` atomically,
    as ``dtype`` (``float16`` or ``float32``).

    Returns the feature attributes added to ``attrs`` (backbone, layers, grid, channels).
    ``stats``, when given, receives ``encode_s``: seconds spent in the forward passes.
    """
    noise = noise or Noise()
    n, height, width = check_sources(sources)
    backbone.check_input_size(height, width, str(sources[0].store.path))
    feature_attrs = _feature_attrs(backbone, noise)
    starts = list(range(0, n, batch_size))
    encode_s = 0.0
    with StoreWriter(out_path, attrs={**attrs, **feature_attrs}) as writer:

        def declare(channels: list[int], grid: list[int]) -> None:
            feature_attrs.update(grid=grid, channels=channels)
            writer.attrs.update(grid=grid, channels=channels)
            for name, shape in output_arrays(sources, n, channels, grid, noise.copies).items():
                writer.create(name, n=n, sample_shape=shape, dtype=np.dtype(dtype))

        def write(features: dict[str, np.ndarray]) -> None:
            for name, value in features.items():
                writer.append(name, value)

        if n == 0:  # nothing to encode: the array shapes come from one blank image
            declare(*backbone.probe(height, width))
        # Batches in order, at most one read ahead and one write behind (helper threads).
        def read(step: int) -> dict[str, torch.Tensor]:
            return _read(sources, starts[step], min(n, starts[step] + batch_size))

        with ReadAhead(read, len(starts)) as batches, BackgroundWriter(max_pending=1) as out:
            for start, images in track(zip(starts, batches), description, total=len(starts)):
                tic = time.perf_counter()
                features = _encode_batch(backbone, sources, images, start, noise, getattr(torch, dtype))
                encode_s += time.perf_counter() - tic
                if start == 0:  # shapes from the first real batch: no extra forward pass
                    maps = [features[f"{sources[0].modality}_{layer}"] for layer in range(3)]
                    declare([int(m.shape[1]) for m in maps], [int(s) for s in maps[0].shape[-2:]])
                out.submit(write, features)
    if stats is not None:
        stats["encode_s"] = encode_s
    return feature_attrs
