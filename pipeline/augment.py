"""LoRA diffusion augmentation (DESIGN 1.3): fine-tune Stable Diffusion with LoRA on a few
images, then generate variations of each shot with img2img.

Training follows the diffusers text-to-image LoRA recipe: frozen VAE, text encoder and UNet;
peft LoRA adapters (``lora_alpha = rank``, so the adapter scale is 1) on the UNet attention
projections and optionally on the text encoder; the standard noise-prediction MSE on VAE
latents (epsilon or v target, as the scheduler config says); AdamW; batch 1; one fixed prompt
with the placeholder token. Half precision base weights on CUDA with fp32 LoRA parameters and
autocast; float32 on CPU.

LoRA files are written with diffusers' own ``save_lora_weights`` (plus peft adapter metadata),
so ``pipe.load_lora_weights(dir, weight_name="lora.safetensors")`` reads them back. Our
safetensors metadata adds ``cmds_ad.base_model`` (the base model the LoRA was trained on) and
``cmds_ad.status`` (``trained`` or ``empty``). An ``empty`` file holds no tensors: it is what
the stage writes when ``augment.n_per_shot`` is 0 (no training, no generation), so DVC's
declared output exists; :func:`load_lora` recognises it and loads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import ModelError, ParamsError
from pipeline.models.diffusion import ModelClock
from pipeline.progress import track

BASE_MODEL_KEY = "cmds_ad.base_model"
STATUS_KEY = "cmds_ad.status"
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraTraining:
    """What one LoRA fine-tuning run needs (the ``augment`` params, minus generation)."""

    rank: int
    targets: tuple[str, ...]
    train_text_encoder: bool
    lr: float
    steps: int
    resolution: int
    color_jitter: float
    seed: int


# --------------------------------------------------------------------------------------------
# Images


def to_square(rgb: np.ndarray) -> np.ndarray:
    """Pad an (H, W, 3) image to a centred square with black (as prepare pads rgb)."""
    h, w = rgb.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return np.pad(rgb, ((top, s - h - top), (left, s - w - left), (0, 0)))


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a square uint8 image (no-op at the same size)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def colour_jitter(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation, each by a factor in [1 - amount, 1 + amount].

    ``x`` is (3, H, W) in [0, 1]. The random factors come from ``generator`` (reproducible).
    """
    factors = 1.0 + amount * (torch.rand(3, generator=generator) * 2.0 - 1.0)
    if amount == 0:
        return x
    x = x * factors[0]
    x = (x - x.mean()) * factors[1] + x.mean()
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    x = (x - grey) * factors[2] + grey
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Training


def deterministic_torch(device: torch.device) -> None:
    """Make CUDA kernels deterministic (CPU kernels already are for a fixed thread count)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def add_lora(pipe: Any, cfg: LoraTraining) -> list[torch.nn.Parameter]:
    """Attach fresh LoRA adapters with peft; returns the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # peft draws the initial A matrices from the global RNG
    try:
        pipe.unet.add_adapter(
            LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                       target_modules=list(cfg.targets))
        )
    except ValueError as err:
        raise ParamsError(f"augment.lora_targets: {err}") from None
    if cfg.train_text_encoder:
        # peft's own injection: transformers' ``add_adapter`` demands a newer peft than exists
        # for this transformers release; the adapter (and its state dict) are the same.
        inject_adapter_in_model(
            LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                       target_modules=list(TEXT_ENCODER_TARGETS)),
            pipe.text_encoder, adapter_name="default",
        )
    trainable = []
    for module in (pipe.unet, pipe.text_encoder):
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # fp32 LoRA weights over fp16 base weights
                trainable.append(param)
    return trainable


def train_lora(
    pipe: Any,
    images: Sequence[np.ndarray],
    prompt: str,
    cfg: LoraTraining,
    clock: ModelClock | None = None,
) -> list[float]:
    """Fine-tune LoRA adapters of ``pipe`` on uint8 (H, W, 3) square images; returns losses."""
    from diffusers import DDPMScheduler

    if not images:
        raise ValueError("no training images")
    device = pipe.unet.device
    deterministic_torch(device)
    clock = clock or ModelClock()
    trainable = add_lora(pipe, cfg)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"models.diffusion: unsupported prediction type {prediction!r}")
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(cfg.seed)
    pixels = [
        torch.from_numpy(np.array(resize_rgb(img, cfg.resolution))).permute(2, 0, 1).float() / 255.0
        for img in images
    ]
    tokens = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    scaling = pipe.vae.config.scaling_factor
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    # A diffusers model's ``.dtype`` walks its parameters on every access; read it once.
    vae_dtype, unet_dtype = pipe.vae.dtype, pipe.unet.dtype
    pipe.unet.train()
    if cfg.train_text_encoder:
        pipe.text_encoder.train()
    else:
        with clock(), torch.no_grad():
            fixed_text = pipe.text_encoder(tokens)[0]
    losses: list[float] = []
    for _ in track(range(cfg.steps), "LoRA training", total=cfg.steps):
        index = int(torch.randint(len(pixels), (1,), generator=generator))
        x = colour_jitter(pixels[index], cfg.color_jitter, generator) * 2.0 - 1.0
        noise_seed = int(torch.randint(2**62, (1,), generator=generator))
        with clock():
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                with torch.no_grad():
                    dist = pipe.vae.encode(x[None].to(device, vae_dtype)).latent_dist
                    latents = dist.sample(torch.Generator().manual_seed(noise_seed)) * scaling
                latents = latents.float()
                step_gen = torch.Generator().manual_seed(noise_seed + 1)
                noise = torch.randn(latents.shape, generator=step_gen).to(device)
                timesteps = torch.randint(num_train_timesteps, (1,), generator=step_gen).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                text = pipe.text_encoder(tokens)[0] if cfg.train_text_encoder else fixed_text
                pred = pipe.unet(noisy.to(unet_dtype), timesteps, text).sample
                target = noise if prediction == "epsilon" else \
                    noise_scheduler.get_velocity(latents, noise, timesteps)
                loss = F.mse_loss(pred.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(float(loss.detach()))
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return losses


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


def lora_snapshot(pipe: Any, train_text_encoder: bool) -> LoraSnapshot:
    """Copy the adapter weights, so the file can be written while the pipeline keeps running."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def state(module: Any) -> dict[str, torch.Tensor]:
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        return {k: v.detach().float().cpu().clone().contiguous() for k, v in sd.items()}

    if not train_text_encoder:
        return LoraSnapshot(state(pipe.unet), _adapter_metadata(pipe.unet.peft_config["default"]))
    return LoraSnapshot(
        state(pipe.unet), _adapter_metadata(pipe.unet.peft_config["default"]),
        state(pipe.text_encoder), _adapter_metadata(pipe.text_encoder.peft_config["default"]),
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
    canonicalise_safetensors(path, {BASE_MODEL_KEY: base_model, STATUS_KEY: "trained"})
    return path


def save_lora(pipe: Any, folder: Path, weight_name: str, base_model: str,
              train_text_encoder: bool) -> Path:
    """Save the trained adapters with diffusers' LoRA writer, then add our metadata keys."""
    return write_lora(lora_snapshot(pipe, train_text_encoder), folder, weight_name, base_model)


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
            is_down = "down" in kind or "lora_A" in kind
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
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except Exception as err:  # noqa: BLE001 - diffusers/peft raise many types for bad files
        raise ModelError(f"{path}: cannot load LoRA: {type(err).__name__}: {err}") from None
    return True


# --------------------------------------------------------------------------------------------
# Generation


def image_seed(augment_seed: int, k: int, fewshot_seed: int, shot_index: int, j: int) -> int:
    """The recorded seed of generated image j of shot ``shot_index`` (stable across runs)."""
    text = f"{augment_seed}/{k}/{fewshot_seed}/{shot_index}/{j}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def use_euler_ancestral(pipe: Any) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)


def check_generation(strength: float, inference_steps: int) -> None:
    if int(inference_steps * strength) < 1:
        raise ParamsError(
            f"augment.strength: strength {strength} x augment.inference_steps "
            f"{inference_steps} leaves no denoising step (needs >= 1)"
        )


def generate(
    pipe: Any,
    rgb: np.ndarray,
    prompt: str,
    seeds: Sequence[int],
    *,
    strength: float,
    guidance: float,
    inference_steps: int,
    resolution: int,
    out_size: int,
    clock: ModelClock | None = None,
) -> np.ndarray:
    """img2img variations of one uint8 square image, one per seed -> (n, S, S, 3) uint8."""
    n = len(seeds)
    if n == 0:
        return np.zeros((0, out_size, out_size, 3), dtype=np.uint8)
    init = Image.fromarray(resize_rgb(rgb, resolution))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    clock = clock or ModelClock()
    with clock():
        out = pipe(
            prompt=[prompt] * n,
            image=[init] * n,
            strength=strength,
            guidance_scale=guidance,
            num_inference_steps=inference_steps,
            generator=generators,
            output_type="np",
        ).images
    images = np.clip(np.round(np.asarray(out, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.stack([resize_rgb(img, out_size) for img in images])


def lora_summary(losses: Sequence[float]) -> dict[str, Any]:
    """Loss figures kept in provenance (first/last mean over up to 10 steps)."""
    if not losses:
        return {}
    head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)):]
    return {"loss_first": float(np.mean(head)), "loss_last": float(np.mean(tail)),
            "steps": len(losses)}


__all__ = [
    "BASE_MODEL_KEY", "STATUS_KEY", "LoraSnapshot", "LoraTraining", "add_lora",
    "check_generation", "colour_jitter", "generate", "image_seed", "load_lora", "lora_snapshot",
    "lora_summary", "read_lora_metadata", "resize_rgb", "save_empty_lora", "save_lora",
    "to_square", "train_lora", "use_euler_ancestral", "write_lora",
]
