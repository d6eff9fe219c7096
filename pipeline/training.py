"""Training the cross-modal mappers (DESIGN 1.5) and reading the feature stores they use.

A *stream* (real or estimated) pairs RGB features with normal features (real normals, or
normals estimated from RGB). Each stream trains two mappers, RGB -> normals (``2d_to_3d``) and
normals -> RGB (``3d_to_2d``), on the same sampled batches. Loss per mapper:
``sum_l a_l * mean(1 - cos(pred_l, target_l))``, the mean over foreground pixels when a mask
is given (real stream) and over all pixels otherwise (estimated stream).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.artifacts import Store, open_store
from pipeline.determinism import deterministic
from pipeline.errors import InputError
from pipeline.models.mapper import Mapper, build_mapper, resize_layers
from pipeline.progress import track

N_LAYERS = 3
DIRECTIONS = ("2d_to_3d", "3d_to_2d")


# ----------------------------------------------------------------------------------- stores
@dataclass(frozen=True)
class FeatureMeta:
    """What a feature store says about itself; mappers only fit stores that agree on it."""

    path: Path
    ids: list[str]
    backbone: Any
    grid: list[int]
    channels: list[int]
    layers: Any = None  # optional attrs: compared when present
    backbone_source: Any = None


# What must agree between a feature store and another one (or the mappers trained on it).
FEATURE_KEYS = ("backbone", "backbone_source", "layers", "grid", "channels")


def feature_meta(store: Store, modalities: Sequence[str]) -> FeatureMeta:
    """Check a feature store's attrs and arrays (``<modality>_<l>``) and return its metadata."""
    for key in ("ids", "backbone", "grid", "channels"):
        if key not in store.attrs:
            raise InputError(f"{store.path}: attribute {key!r} missing (not a feature store?)")
    ids = store.ids
    channels = [int(c) for c in store.attrs["channels"]]
    grid = [int(g) for g in store.attrs["grid"]]
    if len(channels) != N_LAYERS:
        raise InputError(f"{store.path}: attribute 'channels' must list {N_LAYERS} layer widths "
                         f"(got {channels})")
    for modality in modalities:
        for layer, width in enumerate(channels):
            name = f"{modality}_{layer}"
            if name not in store:
                raise InputError(f"{store.path}: no array {name!r} "
                                 f"(has: {', '.join(sorted(store.names()))})")
            shape = tuple(store[name].shape)
            if len(shape) != 4 or shape[0] != len(ids) or shape[1] != width:
                raise InputError(
                    f"{store.path}: array {name!r} has shape {shape}, expected "
                    f"({len(ids)}, {width}, h, w) from attrs 'ids' and 'channels'"
                )
    return FeatureMeta(store.path, ids, store.attrs["backbone"], grid, channels,
                       store.attrs.get("layers"), store.attrs.get("backbone_source"))


def check_same_features(reference: FeatureMeta, reference_name: str, other: FeatureMeta) -> None:
    """Raise when ``other`` was made by another backbone, grid or layer widths."""
    for key in FEATURE_KEYS:
        a, b = getattr(reference, key), getattr(other, key)
        if a != b:
            raise InputError(
                f"{other.path}: feature {key} {b!r} does not match {a!r} of "
                f"{reference_name} (re-run extract_features so both come from the same backbone)"
            )


def rows_of(store_path: Path, store_ids: Sequence[str], wanted: Sequence[str],
            wanted_from: str) -> list[int]:
    """Row index of each wanted id in a store, or an error naming both sources."""
    index = {sid: i for i, sid in enumerate(store_ids)}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise InputError(
            f"{store_path}: samples {missing} listed in {wanted_from} are not in this store "
            f"(it has {len(store_ids)} samples)"
        )
    return [index[w] for w in wanted]


def open_prepared_with_fg(path: Path, purpose: str) -> tuple[Store, list[str]]:
    """A prepare store that must hold the foreground mask, and its sample ids."""
    store = open_store(path)
    if "fg" not in store:
        raise InputError(f"{path}: no foreground mask array 'fg' (needed {purpose}); "
                         "re-run the prepare stage")
    return store, store.ids


def read_rows(store: Store, name: str, rows: Sequence[int]) -> np.ndarray:
    """Read the given rows of one array, one sample at a time (lazy stores)."""
    array = store[name]
    if not rows:
        return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    return np.stack([np.asarray(array[r]) for r in rows])


def modality_copies(store: Store, modality: str, rows: Sequence[int], noisy_copies: bool = True
                    ) -> list[np.ndarray]:
    """Per layer, (N, copies, C, h, w): the noisy copies when the store has them (and
    ``noisy_copies``), else the clean features as 1 copy."""
    noisy = [f"noisy_{modality}_{layer}" for layer in range(N_LAYERS)]
    if noisy_copies and all(name in store for name in noisy):
        out = [read_rows(store, name, rows) for name in noisy]
        for name, arr in zip(noisy, out):
            if arr.ndim != 5:
                raise InputError(f"{store.path}: array {name!r} must be (N, copies, C, h, w), "
                                 f"got shape {arr.shape}")
        return out
    return [read_rows(store, f"{modality}_{layer}", rows)[:, None] for layer in range(N_LAYERS)]


# --------------------------------------------------------------------------------- training
# (images (B, 3, H, W) in [0, 1], "rgb" or "normals", noise added after the normalisation or
# None) -> the three feature maps (B, C_l, h, w) at the backbone's grid, float32, no autograd
Encoder = Callable[[torch.Tensor, str, "torch.Tensor | None"], list[torch.Tensor]]


@dataclass
class OnlineNoise:
    """Fresh input noise at every step, through the frozen backbone (``fit_mapper.noise:
    online``, the published training, OFFICIAL 15): each step encodes the batch's images plus
    new N(0, sigma) noise instead of picking one of the stored noisy copies.

    ``rgb`` and ``normals`` are the stream's images (N, 3, H, W) in [0, 1], in the row order
    of :class:`StreamData`. ``space``: where the RGB noise goes, ``normalised`` (after the
    ImageNet normalisation, published) or ``image`` (in [0, 1] before it); normal images are not
    normalised, so it is the same for them.
    """

    rgb: torch.Tensor
    normals: torch.Tensor
    encode: Encoder
    sigma: float
    space: str = "normalised"

    def features(self, kind: str, rows: Sequence[int], gen: torch.Generator,
                 resolution: int) -> list[torch.Tensor]:
        """The noisy features of ``rows`` at the working resolution; the noise from ``gen``."""
        x = (self.rgb if kind == "rgb" else self.normals)[list(rows)]
        eps = torch.randn(x.shape, generator=gen) * self.sigma
        if kind == "rgb" and self.space == "normalised":
            return resize_layers(self.encode(x, kind, eps), resolution)
        return resize_layers(self.encode(x + eps, kind, None), resolution)


@dataclass
class StreamData:
    """Training pairs of one stream.

    ``rgb[l]`` and ``normals[l]`` are (N, copies, C_l, h, w) arrays (copies may differ between
    the two); ``masks`` is (N, R, R) float at the working resolution or None (all pixels).
    ``rgb_clean``/``normals_clean`` (N, 1, C_l, h, w), when given, are the noise-free features:
    with ``TrainConfig.noise_on = "source"`` a mapper's target is read from them, so only its
    input carries the noise (the published placement, OFFICIAL 10). With ``online`` the inputs
    (and with ``noise_on = "both"`` the targets) are encoded with fresh noise at every step, and
    ``rgb``/``normals`` are the clean features the targets come from.
    """

    rgb: list[np.ndarray]
    normals: list[np.ndarray]
    masks: np.ndarray | None = None
    rgb_clean: list[np.ndarray] | None = None
    normals_clean: list[np.ndarray] | None = None
    online: OnlineNoise | None = None

    def __len__(self) -> int:
        return int(self.rgb[0].shape[0])

    @property
    def rgb_channels(self) -> list[int]:
        return [int(a.shape[2]) for a in self.rgb]

    @property
    def normal_channels(self) -> list[int]:
        return [int(a.shape[2]) for a in self.normals]


@dataclass(frozen=True)
class TrainConfig:
    architecture: str
    resolution: int
    steps: int
    lr: float
    lr_min: float
    weight_decay: float
    layer_weights: tuple[float, ...]
    batch_size: int
    noise_on: str = "both"  # "source": noisy input, clean target; "both": noisy input and target


@dataclass
class StreamResult:
    mappers: dict[str, Mapper]
    losses: dict[str, list[float]] = field(default_factory=dict)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (fit_mapper.seed, few-shot seed, stream, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0]
               & 0x7FFFFFFF)


def resize_mask(fg: np.ndarray, resolution: int) -> np.ndarray:
    """(N, S, S) 0/1 masks -> (N, R, R) float32, nearest neighbour at the pixel centres.

    Cell i of the working grid covers pixels [i S/R, (i+1) S/R) and is centred on their middle:
    that is where bilinear resizing (``align_corners=False``, features to the working grid and
    maps back to S) puts it, and how ``preprocess.resize_nearest`` samples. torch's legacy
    ``nearest`` would read each cell's first (top-left) pixel instead, half a cell off.
    """
    t = torch.from_numpy(np.asarray(fg, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(resolution, resolution), mode="nearest-exact")[:, 0].numpy()


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine decay from lr (step 0) to lr_min (last step)."""
    if total <= 1:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * step / (total - 1)))


def mapping_loss(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                 weights: Sequence[float], mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_l a_l * mean(1 - cos(pred_l, target_l)); masked mean over (B, H, W) if mask given."""
    total = pred[0].new_zeros(())
    for a, p, t in zip(weights, pred, target, strict=True):
        d = 1.0 - F.cosine_similarity(p, t, dim=1)
        if mask is None:
            total = total + a * d.mean()
        else:
            total = total + a * (d * mask).sum() / mask.sum().clamp_min(1.0)
    return total


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Sample indices epoch by epoch (a fresh permutation each epoch), batch_size per step."""
    pool: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not pool:
                pool = torch.randperm(n, generator=gen).tolist()
            batch.append(pool.pop())
        yield batch


def _gather(layers: Sequence[np.ndarray], rows: Sequence[int], gen: torch.Generator,
            device: torch.device, resolution: int) -> list[torch.Tensor]:
    """Pick one (noisy) copy per sample, same copy across layers; upsample to resolution."""
    copies = int(layers[0].shape[1])
    pick = torch.randint(copies, (len(rows),), generator=gen).tolist() if copies > 1 else \
        [0] * len(rows)
    out = []
    for arr in layers:
        x = np.stack([arr[r, c] for r, c in zip(rows, pick)]).astype(np.float32)
        out.append(torch.from_numpy(x).to(device))
    return resize_layers(out, resolution)


Pairs = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def _stored_pairs(data: StreamData, config: TrainConfig, rows: Sequence[int],
                  gen: torch.Generator, device: torch.device) -> Pairs:
    """(rgb input, normals input, rgb target, normals target) from the stored (noisy) copies."""
    rgb = _gather(data.rgb, rows, gen, device, config.resolution)
    nrm = _gather(data.normals, rows, gen, device, config.resolution)
    rgb_target, nrm_target = rgb, nrm
    if config.noise_on == "source":
        # The clean copy is the target; a single copy draws nothing from gen.
        if data.rgb_clean is not None:
            rgb_target = _gather(data.rgb_clean, rows, gen, device, config.resolution)
        if data.normals_clean is not None:
            nrm_target = _gather(data.normals_clean, rows, gen, device, config.resolution)
    return rgb, nrm, rgb_target, nrm_target


def _online_pairs(data: StreamData, config: TrainConfig, rows: Sequence[int],
                  gen: torch.Generator, noise_gen: torch.Generator, device: torch.device) -> Pairs:
    """The same, with inputs encoded from the images plus fresh noise (``data.online``)."""
    online = data.online
    assert online is not None
    rgb = [f.to(device) for f in online.features("rgb", rows, noise_gen, config.resolution)]
    nrm = [f.to(device) for f in online.features("normals", rows, noise_gen, config.resolution)]
    if config.noise_on == "both":
        rgb_target = [f.to(device) for f in online.features("rgb", rows, noise_gen,
                                                             config.resolution)]
        nrm_target = [f.to(device) for f in online.features("normals", rows, noise_gen,
                                                             config.resolution)]
        return rgb, nrm, rgb_target, nrm_target
    return (rgb, nrm, _gather(data.rgb, rows, gen, device, config.resolution),
            _gather(data.normals, rows, gen, device, config.resolution))


def train_stream(data: StreamData, config: TrainConfig, seed: int, device: torch.device,
                 description: str = "fit mappers") -> StreamResult:
    """Train the 2d_to_3d and 3d_to_2d mappers of one stream on the same sampled batches."""
    if len(data) == 0:
        raise InputError(f"{description}: no training samples")
    if len(config.layer_weights) != N_LAYERS:
        raise ValueError("layer_weights must have one weight per layer")
    if config.noise_on not in ("source", "both"):
        raise ValueError(f"noise_on must be 'source' or 'both', got {config.noise_on!r}")
    sources = {"2d_to_3d": (data.rgb_channels, data.normal_channels),
               "3d_to_2d": (data.normal_channels, data.rgb_channels)}
    mappers: dict[str, Mapper] = {}
    optims: dict[str, torch.optim.Optimizer] = {}
    for i, direction in enumerate(DIRECTIONS):
        # Initialise each mapper from its own seed, independent of build order and global state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 1 + i))
            mapper = build_mapper(config.architecture, *sources[direction])
        mapper.to(device).train()
        mappers[direction] = mapper
        optims[direction] = torch.optim.AdamW(mapper.parameters(), lr=config.lr,
                                              weight_decay=config.weight_decay)
    losses: dict[str, list[float]] = {d: [] for d in DIRECTIONS}
    gen = torch.Generator().manual_seed(derive_seed(seed, 0))
    noise_gen = torch.Generator().manual_seed(derive_seed(seed, 3))  # online noise only
    with deterministic(device):
        batches = _batches(len(data), config.batch_size, config.steps, gen)
        for step, rows in enumerate(track(batches, description, total=config.steps)):
            if data.online is None:
                rgb, nrm, rgb_target, nrm_target = _stored_pairs(data, config, rows, gen, device)
            else:
                rgb, nrm, rgb_target, nrm_target = _online_pairs(data, config, rows, gen,
                                                                 noise_gen, device)
            mask = None
            if data.masks is not None:
                mask = torch.from_numpy(data.masks[rows]).to(device)
            lr = cosine_lr(step, config.steps, config.lr, config.lr_min)
            pairs = (("2d_to_3d", (rgb, nrm_target)), ("3d_to_2d", (nrm, rgb_target)))
            for direction, (src, tgt) in pairs:
                opt = optims[direction]
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                loss = mapping_loss(mappers[direction](src), tgt, config.layer_weights, mask)
                loss.backward()
                opt.step()
                losses[direction].append(float(loss.detach()))
    for mapper in mappers.values():
        mapper.eval()
    return StreamResult(mappers, losses)
