"""img2img variations of each shot with the trained model, and the seeds that make them
reproducible."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.augment.images import resize_rgb
from pipeline.errors import ParamsError
from pipeline.models.diffusion import ModelClock

# --------------------------------------------------------------------------------------------
# Generation


def image_seed(augment_seed: int, k: int, fewshot_seed: int, shot_index: int, j: int) -> int:
    """The recorded seed of generated image j of shot ``shot_index`` (stable across runs)."""
    text = f"{augment_seed}/{k}/{fewshot_seed}/{shot_index}/{j}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def use_euler_ancestral(pipe: Any) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)


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
    out_interpolation: str = "bicubic",
    generator_device: str = "cpu",
    clock: ModelClock | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """img2img variations of one uint8 square image, one per seed.

    The init image is ``rgb`` resized (bicubic, as PIL's default ``resize`` in the published
    script) to ``resolution``; returns the images at the generation resolution (n, R, R, 3)
    and resized with ``out_interpolation`` (``data.rgb_interpolation``) to ``out_size``
    (n, S, S, 3), both uint8.
    ``generator_device``: ``cpu`` (the same noise on every device) or ``device`` (a generator
    on the model's device, as the published script seeds ``torch.Generator("cuda")``).
    """
    n = len(seeds)
    if n == 0:
        return (np.zeros((0, resolution, resolution, 3), dtype=np.uint8),
                np.zeros((0, out_size, out_size, 3), dtype=np.uint8))
    init = Image.fromarray(resize_rgb(rgb, resolution))
    where = pipe.device if generator_device == "device" else torch.device("cpu")
    generators = [torch.Generator(device=where).manual_seed(int(s)) for s in seeds]
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
    full = np.clip(np.round(np.asarray(out, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return full, np.stack([resize_rgb(img, out_size, out_interpolation) for img in full])


def shot_seeds(image_seeds: Sequence[int], n_per_shot: int, augment_seed: int, k: int,
               fewshot_seed: int, n_shots: int) -> list[list[int]]:
    """The seeds of each shot's images: the first ``n_per_shot`` of ``image_seeds`` for every
    shot (the published fixed seeds), or, for an empty list, seeds derived per image."""
    if image_seeds:
        if n_per_shot > len(image_seeds):
            raise ParamsError(
                f"augment.image_seeds: {len(image_seeds)} seeds for augment.n_per_shot "
                f"{n_per_shot} images per shot (give at least n_per_shot, or [] for derived seeds)"
            )
        return [[int(s) for s in image_seeds[:n_per_shot]] for _ in range(n_shots)]
    return [[image_seed(augment_seed, k, fewshot_seed, i, j) for j in range(n_per_shot)]
            for i in range(n_shots)]
