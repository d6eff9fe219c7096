"""Released LoRA files of the published code (cloneofsimo ``lora_pti``), converted into this
project's LoRA format (``lora_files``: diffusers keys, peft metadata, a token file).

The published ``final_lora.safetensors`` (one per category, ``<root>/<category>/``) holds,
as its ``save_safeloras_with_embeds`` writes them (published lora.py:451-483):

- ``unet:<i>:up`` (out, r) and ``unet:<i>:down`` (r, in), and ``text_encoder:<i>:up|down``:
  the i-th adapted ``nn.Linear`` of that model, in lora_pti's order (below). ``up`` already
  carries the LoRA scale (1.0 in the published run); stored float16;
- the learned token's embedding row under the token itself (e.g. ``<bagel>``);
- string metadata: ``unet`` / ``text_encoder`` = a JSON list of the ancestor class names
  (``["CrossAttention", "Attention", "GEGLU"]``, ``["CLIPSdpaAttention"]``),
  ``<model>:<i>:rank`` = the rank, ``<token>`` = ``"<embed>"``.

lora_pti's order: every module whose class name is a target, in ``model.modules()`` order,
then each ``nn.Linear`` inside it in ``named_modules()`` order. Class names differ between
library versions (diffusers' ``CrossAttention`` became ``Attention``; transformers' CLIP
attention was ``CLIPAttention`` / ``CLIPSdpaAttention``), so a target matches its whole alias
group. The file is read with safetensors only (no pickle); every key, index, rank and shape
is checked against the loaded pipeline before anything is converted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.augment.lora_files import LoraSnapshot
from pipeline.errors import ModelError
from pipeline.params import LORA_RELEASE_FILE as RELEASED_FILE  # lora_pti's last save
EMBED_FLAG = "<embed>"  # lora_pti's metadata value of a token embedding
MODELS = ("unet", "text_encoder")
# Class names that are one module across library versions.
ALIASES = (
    frozenset({"CrossAttention", "Attention"}),
    frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}),
)


def released_path(root: str | Path, category: str) -> Path:
    """Where the release keeps a category's LoRA: ``<root>/<category>/final_lora.safetensors``."""
    return Path(root) / category / RELEASED_FILE


def _classes(targets: list[str]) -> set[str]:
    names = set(targets)
    for group in ALIASES:
        if names & group:
            names |= group
    return names


def adapted_layers(model: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers lora_pti adapts in ``model``, in its order, as (full name, layer)."""
    classes = _classes(targets)
    found = []
    for prefix, ancestor in model.named_modules():
        if type(ancestor).__name__ not in classes:
            continue
        for name, module in ancestor.named_modules():
            if isinstance(module, torch.nn.Linear):
                found.append((f"{prefix}.{name}" if prefix else name, module))
    return found


@dataclass(frozen=True)
class ReleasedLora:
    """The tensors and metadata of one lora_pti file, grouped (not yet matched to a model)."""

    path: Path
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # model -> [(up, down)] by index
    targets: dict[str, list[str]]  # model -> ancestor class names
    token: str
    embedding: torch.Tensor  # (1, D) float32


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{path}: released LoRA file not found (augment.lora_checkpoints holds "
                         f"<category>/{RELEASED_FILE})")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise ModelError(f"{path}: not a readable safetensors file ({err})") from None


def _group(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]
           ) -> tuple[dict[str, dict[int, dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Tensors by model and index ({model: {i: {"up", "down"}}}), and the token embeddings."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    embeds: dict[str, torch.Tensor] = {}
    for key, value in sorted(tensors.items()):
        if metadata.get(key) == EMBED_FLAG:
            embeds[key] = value
            continue
        parts = key.split(":")
        if len(parts) != 3 or parts[0] not in MODELS or not parts[1].isdigit() \
                or parts[2] not in ("up", "down"):
            raise ModelError(f"{path}: unexpected tensor {key!r} (a lora_pti file holds "
                             "unet:<i>:up|down, text_encoder:<i>:up|down and token embeddings)")
        if not value.is_floating_point() or value.ndim != 2 or not bool(torch.isfinite(value).all()):
            raise ModelError(f"{path}: tensor {key!r} must be a finite 2-D float matrix, got "
                             f"{value.dtype} {tuple(value.shape)}")
        groups.setdefault(parts[0], {}).setdefault(int(parts[1]), {})[parts[2]] = value
    return groups, embeds


def _pairs(path: Path, name: str, by_index: dict[int, dict[str, torch.Tensor]],
           metadata: dict[str, str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) of one model by index: contiguous indices, both halves, the recorded rank."""
    pairs = []
    for i in range(max(by_index) + 1):
        pair = by_index.get(i, {})
        for half in ("up", "down"):
            if half not in pair:
                raise ModelError(f"{path}: tensor '{name}:{i}:{half}' missing")
        up, down = pair["up"], pair["down"]
        rank = metadata.get(f"{name}:{i}:rank")
        if rank is None or not rank.isdigit():
            raise ModelError(f"{path}: metadata '{name}:{i}:rank' missing or not a number")
        if up.shape[1] != int(rank) or down.shape[0] != int(rank):
            raise ModelError(f"{path}: '{name}:{i}:up' {tuple(up.shape)} and '{name}:{i}:down' "
                             f"{tuple(down.shape)} do not have the recorded rank {rank}")
        pairs.append((up.float(), down.float()))
    return pairs


def read_released_lora(path: str | Path) -> ReleasedLora:
    """Read and check a lora_pti file on its own (the model-independent checks)."""
    path = Path(path)
    metadata, tensors = _read(path)
    groups, embeds = _group(path, metadata, tensors)
    missing = [m for m in MODELS if m not in groups]
    if missing:
        raise ModelError(f"{path}: no '{missing[0]}:<i>:up/down' tensors (the published LoRA "
                         "adapts the UNet and the text encoder)")
    targets = {}
    for name in MODELS:
        try:
            targets[name] = [str(t) for t in json.loads(metadata[name])]
        except (KeyError, ValueError, TypeError):
            raise ModelError(f"{path}: metadata {name!r} (the JSON list of target module "
                             "classes) missing or unreadable") from None
    if len(embeds) != 1:
        raise ModelError(f"{path}: expected one learned token embedding (metadata "
                         f"{EMBED_FLAG!r}), found {sorted(embeds) or 'none'}")
    token, row = next(iter(embeds.items()))
    if row.ndim not in (1, 2) or (row.ndim == 2 and row.shape[0] != 1) or not row.is_floating_point():
        raise ModelError(f"{path}: token {token!r} has shape {tuple(row.shape)}, expected (D,)")
    pairs = {name: _pairs(path, name, groups[name], metadata) for name in MODELS}
    return ReleasedLora(path, pairs, targets, token, row.reshape(1, -1).float().contiguous())


def _match(lora: ReleasedLora, name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft keys (``<layer>.lora_A.weight`` = down, ``lora_B`` = up) of one model, each pair
    checked against the layer lora_pti would have put it on."""
    layers = adapted_layers(model, lora.targets[name])
    pairs = lora.pairs[name]
    if len(layers) != len(pairs):
        raise ModelError(
            f"{lora.path}: {len(pairs)} '{name}:<i>' LoRA pairs, but this base model has "
            f"{len(layers)} Linear layers in {sorted(lora.targets[name])} modules (trained on "
            "another base model?)")
    state = {}
    for i, ((layer_name, layer), (up, down)) in enumerate(zip(layers, pairs)):
        if up.shape[0] != layer.out_features or down.shape[1] != layer.in_features:
            raise ModelError(
                f"{lora.path}: '{name}:{i}:up' {tuple(up.shape)} / '{name}:{i}:down' "
                f"{tuple(down.shape)} do not fit layer {name}.{layer_name} "
                f"({layer.in_features} -> {layer.out_features}) of this base model")
        state[f"{layer_name}.lora_A.weight"] = down.contiguous()
        state[f"{layer_name}.lora_B.weight"] = up.contiguous()
    return state


def _metadata(lora: ReleasedLora, name: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The peft adapter config of the converted layers (alpha = rank: scale 1, as published)."""
    from peft import LoraConfig

    from pipeline.augment.lora_files import _adapter_metadata

    ranks = {int(down.shape[0]) for _, down in lora.pairs[name]}
    if len(ranks) != 1:
        raise ModelError(f"{lora.path}: '{name}' layers have several ranks {sorted(ranks)}; "
                         "one rank per model is supported")
    rank = ranks.pop()
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return _adapter_metadata(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                        target_modules=layers))


def released_snapshot(pipe: Any, path: str | Path, token: str | None = None) -> LoraSnapshot:
    """The released file as this project's LoRA (``lora_files.write_lora`` writes it).

    ``token``: the placeholder token the prompt uses; the file's token must be it.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    lora = read_released_lora(path)
    if token is not None and lora.token != token:
        raise ModelError(f"{lora.path}: the learned token is {lora.token!r}, but the prompt uses "
                         f"{token!r} (augment.placeholder_token)")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if lora.embedding.shape[1] != width:
        raise ModelError(f"{lora.path}: token {lora.token!r} has width {lora.embedding.shape[1]}, "
                         f"this base model's text encoder {width}")
    parts = {}
    for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        state = _match(lora, name, model)
        parts[name] = (convert_state_dict_to_diffusers(state), _metadata(lora, name, state))
    return LoraSnapshot(parts["unet"][0], parts["unet"][1], parts["text_encoder"][0],
                        parts["text_encoder"][1], token=lora.token, token_embedding=lora.embedding,
                        status="released")
