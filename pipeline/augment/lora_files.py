"""LoRA files.

LoRA files are written with diffusers' own ``save_lora_weights`` (plus peft adapter metadata),
so ``pipe.load_lora_weights(dir, weight_name="lora.safetensors")`` reads them back. Our
safetensors metadata adds ``cmds_ad.base_model`` and ``cmds_ad.status`` (``trained``,
``released`` (converted from the published lora_pti file) or ``empty``). A learned token goes to a sibling ``token.safetensors`` in diffusers' textual
inversion format (one tensor, named by the token), which ``pipe.load_textual_inversion`` reads;
:func:`load_lora` loads both. An ``empty`` LoRA file holds no tensors: it is what the stage
writes when ``augment.n_per_shot`` is 0, so DVC's declared output exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ModelError

BASE_MODEL_KEY = "cmds_ad.base_model"
STATUS_KEY = "cmds_ad.status"
TOKEN_KEY = "cmds_ad.token"
TOKEN_FILE = "token.safetensors"


# --------------------------------------------------------------------------------------------
# LoRA files


def _adapter_metadata(config: Any) -> dict[str, Any]:
    """A peft config as plain JSON values with a stable order (sets become sorted lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    return plain(config.to_dict())


def canonicalise_safetensors(path: Path, extra_metadata: dict[str, str] | None = None) -> None:
    """Rewrite a safetensors header with sorted keys, adding ``extra_metadata`` entries.

    safetensors serialises the ``__metadata__`` map in hash order, which differs between
    runs; a sorted header makes identical weights give byte-identical files (DVC caching).
    Tensor data and offsets are untouched, so metadata is added here without re-serialising
    the tensors.
    """
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    if extra_metadata:
        header.setdefault("__metadata__", {}).update(extra_metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    os.replace(tmp, path)


@dataclass(frozen=True)
class LoraSnapshot:
    """The trained adapters in diffusers' LoRA key format, copied off the live model."""

    unet: dict[str, torch.Tensor]
    unet_metadata: dict[str, Any]
    text_encoder: dict[str, torch.Tensor] | None = None
    text_encoder_metadata: dict[str, Any] | None = None
    token: str | None = None  # the learned placeholder token and its embedding row
    token_embedding: torch.Tensor | None = None
    status: str = "trained"  # or "released": converted from the published lora_pti file


def token_snapshot(pipe: Any, token: str) -> torch.Tensor:
    """A copy of a token's embedding row, (1, D) float32."""
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    weight = pipe.text_encoder.get_input_embeddings().weight
    return weight[token_id : token_id + 1].detach().float().cpu().clone().contiguous()


def lora_snapshot(pipe: Any, train_text_encoder: bool, token: str | None = None) -> LoraSnapshot:
    """Copy the adapter weights (and the learned token's row), so the files can be written
    while the pipeline keeps running (or is cast to another precision)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def state(module: Any) -> dict[str, torch.Tensor]:
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        return {k: v.detach().float().cpu().clone().contiguous() for k, v in sd.items()}

    row = token_snapshot(pipe, token) if token is not None else None
    if not train_text_encoder:
        return LoraSnapshot(state(pipe.unet), _adapter_metadata(pipe.unet.peft_config["default"]),
                            token=token, token_embedding=row)
    return LoraSnapshot(
        state(pipe.unet), _adapter_metadata(pipe.unet.peft_config["default"]),
        state(pipe.text_encoder), _adapter_metadata(pipe.text_encoder.peft_config["default"]),
        token=token, token_embedding=row,
    )


def write_lora(snapshot: LoraSnapshot, folder: Path, weight_name: str, base_model: str) -> Path:
    """Write the adapters with diffusers' LoRA writer, then add our metadata keys."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=snapshot.unet,
        text_encoder_lora_layers=snapshot.text_encoder,
        weight_name=weight_name,
        safe_serialization=True,
        unet_lora_adapter_metadata=snapshot.unet_metadata,
        text_encoder_lora_adapter_metadata=snapshot.text_encoder_metadata,
    )
    path = folder / weight_name
    extra = {BASE_MODEL_KEY: base_model, STATUS_KEY: snapshot.status}
    if snapshot.token is not None:
        extra[TOKEN_KEY] = snapshot.token
        write_token(folder / TOKEN_FILE, snapshot.token, snapshot.token_embedding, base_model)
    canonicalise_safetensors(path, extra)
    return path


def write_token(path: Path, token: str, embedding: torch.Tensor, base_model: str) -> Path:
    """A learned token in diffusers' textual-inversion format: one tensor named by the token."""
    from safetensors.torch import save_file

    save_file({token: embedding}, str(path), metadata={"format": "pt", BASE_MODEL_KEY: base_model})
    canonicalise_safetensors(path)
    return path


def save_lora(pipe: Any, folder: Path, weight_name: str, base_model: str,
              train_text_encoder: bool, token: str | None = None) -> Path:
    """Save the trained adapters (and the learned token, if any) with our metadata keys."""
    return write_lora(lora_snapshot(pipe, train_text_encoder, token), folder, weight_name,
                      base_model)


def save_empty_lora(path: Path, base_model: str) -> Path:
    """The marker written when augmentation is disabled: a valid safetensors file, no tensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({}, str(path), metadata={"format": "pt", BASE_MODEL_KEY: base_model,
                                       STATUS_KEY: "empty"})
    canonicalise_safetensors(path)
    return path


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: LoRA file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise ModelError(f"{path}: not a readable safetensors LoRA file ({err})") from None


def _check_shapes(pipe: Any, path: Path) -> None:
    """Every LoRA tensor must fit a layer of this pipeline (catches other base models)."""
    from safetensors import safe_open

    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            prefix, _, rest = key.partition(".")
            if prefix not in modules or ".lora" not in rest:
                raise ModelError(f"{path}: unexpected tensor {key!r} in a LoRA file")
            module_name, _, kind = rest.partition(".lora")
            try:
                layer = modules[prefix].get_submodule(module_name)
            except AttributeError:
                raise ModelError(
                    f"{path}: LoRA layer {prefix}.{module_name} does not exist in this base "
                    "model (trained on another base model?)"
                ) from None
            base = getattr(layer, "base_layer", layer)
            fan_in = getattr(base, "in_features", getattr(base, "in_channels", None))
            fan_out = getattr(base, "out_features", getattr(base, "out_channels", None))
            shape = tuple(f.get_slice(key).get_shape())
            # ``kind`` follows ".lora": "_A.weight" (peft) or ".down.weight" (older format).
            is_down = kind.startswith("_A") or "down" in kind
            ok = (shape[1] == fan_in) if is_down else (shape[0] == fan_out)
            if not ok:
                raise ModelError(
                    f"{path}: LoRA tensor {key} has shape {shape}, which does not fit layer "
                    f"{prefix}.{module_name} ({fan_in} -> {fan_out}) of this base model "
                    "(trained on another base model?)"
                )


def load_lora(pipe: Any, path: str | Path, base_model: str | None = None) -> bool:
    """Load a LoRA file written by :func:`save_lora` into ``pipe``; False for an empty marker.

    Raises ModelError naming the file when it was trained on another base model (recorded id
    differs from ``base_model``, or its tensors do not fit this pipeline's layers).
    """
    path = Path(path)
    metadata = read_lora_metadata(path)
    if metadata.get(STATUS_KEY) == "empty":
        return False
    recorded = metadata.get(BASE_MODEL_KEY)
    if base_model is not None and recorded is not None and recorded != base_model:
        raise ModelError(
            f"{path}: LoRA was trained on base model {recorded!r}, not {base_model!r}"
        )
    _check_shapes(pipe, path)
    token = metadata.get(TOKEN_KEY)
    if token is not None:
        load_token(pipe, path.parent / TOKEN_FILE, token)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except Exception as err:  # noqa: BLE001 - diffusers/peft raise many types for bad files
        raise ModelError(f"{path}: cannot load LoRA: {type(err).__name__}: {err}") from None
    return True


def load_token(pipe: Any, path: Path, token: str) -> None:
    """Add a learned token (written by :func:`write_token`) to ``pipe``'s tokenizer/encoder."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: token embedding file not found (the LoRA file next to it "
                         f"was trained with the token {token!r})")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise ModelError(f"{path}: not a readable safetensors file ({err})") from None
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if list(tensors) != [token] or tuple(tensors[token].shape) != (1, width):
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ModelError(f"{path}: expected one tensor {token!r} of shape (1, {width}) "
                         f"(this base model's embedding width), got {shapes}")
    if token in pipe.tokenizer.get_vocab():
        raise ModelError(f"{path}: token {token!r} is already in this pipeline's tokenizer")
    pipe.load_textual_inversion(tensors, token=token)
