"""Training of the demo normals model ``demo:tiny-marigold`` (``cmds-ad demo-models``).

The model is Marigold in miniature: the tiny VAE, UNet and text encoder of
:mod:`pipeline.models.diffusion` in a ``MarigoldNormalsPipeline``, trained the way Marigold is:

1. The VAE (``AutoencoderKL``) is trained as an autoencoder on RGB images and normal maps
   (both as 3-channel images in [-1, 1]), since Marigold's one VAE encodes the image and
   encodes/decodes the normals. Reconstruction is through the posterior mean (what the
   pipeline uses), with a small KL term; then the latent scaling factor is set to
   1 / std of the latents, as Stable Diffusion's 0.18215 does for its VAE.
2. The UNet gets the image latent and the noisy normals latent concatenated (8 channels) and
   the empty-prompt text embedding, and is trained with Marigold's objective: v-prediction
   (``get_velocity``) at timesteps drawn uniformly from the 1000 training steps of the
   scheduler that the pipeline ships (DDIM, scaled-linear betas, v-prediction, trailing
   spacing at inference). Marigold's multi-resolution noise is not used: at a 16 x 16 latent
   it has little to add.

The pairs are rendered by the demo generator (:func:`pipeline.data.demo.render_training_pair`)
from a random stream the demo dataset never uses, and preprocessed as the demo feeds Marigold:
padded square and resized to ``data.size`` (bicubic) as prepare does, then the pipeline's own
image processor resizes to the processing resolution. The targets are the renderer's exact
normals in Marigold's frame (X right, Y up, Z towards the viewer).

Everything derives from ``TrainingConfig.seed``; each pair depends only on (seed, index), and
the batches, timesteps and noise come from seeded generators, so a run can stop after a few
steps (``stop_after``) and reproduce the first steps of the full run exactly
(``tests/test_demo_models.py``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.demo import render_training_pair
from pipeline.data.preprocess import RGB_PAD_VALUE, pad_square, resize_rgb

PREPARED_SIZE = 224  # params.yaml data.size: what estimate_normals gets from prepare
RESOLUTION = 64  # the tiny model's default processing resolution
VAE_SCALE_FACTOR = 4  # three VAE blocks


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 2026
    pairs: int = 512
    vae_steps: int = 500
    vae_batch: int = 8  # half images, half normal maps
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    unet_steps: int = 1100
    unet_batch: int = 16
    unet_lr: float = 1e-3
    unet_lr_min: float = 5e-5
    grad_clip: float = 1.0


# --------------------------------------------------------------------------------------------
# Data


def _marigold_processor() -> Any:
    from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor

    return MarigoldImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)


def model_images(rgb: np.ndarray, normals: np.ndarray, processor: Any) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """One rendered pair -> the image as the pipeline sees it and the target normals, both
    (3, R, R) float in [-1, 1]; normals in Marigold's frame, unit length."""
    prepared = resize_rgb(pad_square(rgb, RGB_PAD_VALUE), PREPARED_SIZE, "bicubic")
    image = torch.from_numpy(np.array(prepared)).permute(2, 0, 1)[None].float() / 255.0
    image, _, _ = processor.preprocess(image, RESOLUTION, "bilinear")
    # Camera frame, facing the camera (X right, Y down, Z forward) -> Marigold's (Y up, Z to
    # the viewer); the padded band (no scene) faces the viewer.
    m = normals * np.array([1.0, -1.0, -1.0])
    m = pad_square(m, 0.0)
    m[np.linalg.norm(m, axis=-1) < 0.5] = (0.0, 0.0, 1.0)
    target = torch.from_numpy(m).permute(2, 0, 1)[None].float()
    target = F.interpolate(target, size=(RESOLUTION, RESOLUTION), mode="bilinear",
                           align_corners=False, antialias=True)
    target = target / target.norm(dim=1, keepdim=True).clamp(min=1e-6)
    return image[0], target[0]


class Pairs:
    """Training pairs rendered on first use (each depends only on seed and index)."""

    def __init__(self, seed: int, count: int) -> None:
        self.seed, self.count = seed, count
        self._processor = _marigold_processor()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self._cache:
            rgb, normals = render_training_pair(self.seed, index)
            self._cache[index] = model_images(rgb, normals, self._processor)
        return self._cache[index]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


# --------------------------------------------------------------------------------------------
# Training


def _cosine(step: int, total: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _descend(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor,
             lr: float, grad_clip: float) -> float:
    """One optimiser step at learning rate ``lr`` with clipped gradients; the loss value."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def _report(log: Callable[[str], None] | None, name: str, step: int, total: int,
            losses: list[float]) -> None:
    if log and (step + 1) % 100 == 0:
        log(f"{name} step {step + 1}/{total}: loss {np.mean(losses[-100:]):.5f}")


def train_vae(cfg: TrainingConfig, pairs: Pairs, stop_after: int | None = None,
              log: Callable[[str], None] | None = None) -> tuple[Any, list[float]]:
    """The tiny VAE, trained as an autoencoder of images and normal maps; returns it (eval
    mode, scaling factor not yet set) and the loss of every step."""
    from pipeline.models.diffusion import _tiny_vae

    vae = _tiny_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    half = cfg.vae_batch // 2
    losses: list[float] = []
    steps = cfg.vae_steps if stop_after is None else min(stop_after, cfg.vae_steps)
    for step in range(steps):
        idx = torch.randint(pairs.count, (cfg.vae_batch,), generator=g)
        images, _ = pairs.batch(idx[:half])
        _, normals = pairs.batch(idx[half:])
        x = torch.cat([images, normals])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        loss = F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean()
        lr = _cosine(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_lr * 0.05)
        losses.append(_descend(opt, vae, loss, lr, cfg.grad_clip))
        _report(log, "vae", step, cfg.vae_steps, losses)
    return vae.eval(), losses


@torch.no_grad()
def encode(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """Scaled posterior-mean latents, as MarigoldNormalsPipeline encodes."""
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def scaling_factor(vae: Any, pairs: Pairs) -> float:
    """1 / std of the unscaled latents of all pairs (images and normals together)."""
    lat = []
    for start in range(0, pairs.count, 64):
        images, normals = pairs.batch(torch.arange(start, min(start + 64, pairs.count)))
        lat.append(vae.encode(torch.cat([images, normals])).latent_dist.mean)
    return float(f"{1.0 / float(torch.cat(lat).std()):.6g}")


def empty_text_embedding() -> torch.Tensor:
    """(1, T, D) embedding of the empty prompt by the demo text encoder, computed as the
    pipeline computes it."""
    from pipeline.models.diffusion import _tiny_text_parts

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder = _tiny_text_parts(Path(tmp))
    ids = tokenizer("", padding="do_not_pad", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def train_unet(cfg: TrainingConfig, pairs: Pairs, vae: Any, stop_after: int | None = None,
               log: Callable[[str], None] | None = None) -> tuple[Any, list[float]]:
    """The 8-channel UNet trained with Marigold's v-prediction objective; returns it (eval
    mode) and the loss of every step."""
    from diffusers import DDIMScheduler

    from pipeline.models.diffusion import _tiny_unet, marigold_scheduler_config

    scheduler = DDIMScheduler(**marigold_scheduler_config())
    unet = _tiny_unet(8).train()
    text = empty_text_embedding()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch_latents(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        todo = sorted({int(i) for i in idx} - latents.keys())
        for start in range(0, len(todo), 64):  # in fixed chunks: the same numbers either way
            chunk = torch.tensor(todo[start:start + 64])
            images, normals = pairs.batch(chunk)
            zi, zn = encode(vae, images), encode(vae, normals)
            for j, i in enumerate(chunk.tolist()):
                latents[i] = (zi[j], zn[j])
        return (torch.stack([latents[int(i)][0] for i in idx]),
                torch.stack([latents[int(i)][1] for i in idx]))

    losses: list[float] = []
    steps = cfg.unet_steps if stop_after is None else min(stop_after, cfg.unet_steps)
    train_steps = scheduler.config.num_train_timesteps
    for step in range(steps):
        idx = torch.randint(pairs.count, (cfg.unet_batch,), generator=g)
        t = torch.randint(train_steps, (cfg.unet_batch,), generator=g)
        z_image, z_normals = batch_latents(idx)
        noise = torch.randn(z_normals.shape, generator=g)
        noisy = scheduler.add_noise(z_normals, noise, t)
        target = scheduler.get_velocity(z_normals, noise, t)
        pred = unet(torch.cat([z_image, noisy], dim=1), t,
                    encoder_hidden_states=text.expand(len(idx), -1, -1)).sample
        loss = F.mse_loss(pred, target)
        lr = _cosine(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_lr_min)
        losses.append(_descend(opt, unet, loss, lr, cfg.grad_clip))
        _report(log, "unet", step, cfg.unet_steps, losses)
    return unet.eval(), losses


def train_demo_marigold(out: str | Path, cfg: TrainingConfig = TrainingConfig(),
                        log: Callable[[str], None] | None = None) -> Path:
    """Train the demo normals model and write ``out/{vae,unet}`` (diffusers folders, fp32
    safetensors) and ``out/training.json`` (the config and every step's loss). The files are
    byte-identical for the same config on the same machine."""
    out = Path(out)
    pairs = Pairs(cfg.seed, cfg.pairs)
    for i in range(cfg.pairs):  # render everything up front (progress is clearer)
        pairs[i]
    if log:
        log(f"{cfg.pairs} training pairs rendered")
    vae, vae_losses = train_vae(cfg, pairs, log=log)
    vae.register_to_config(scaling_factor=scaling_factor(vae, pairs))
    unet, unet_losses = train_unet(cfg, pairs, vae, log=log)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    record = {"config": asdict(cfg), "vae_loss": vae_losses, "unet_loss": unet_losses}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return out
