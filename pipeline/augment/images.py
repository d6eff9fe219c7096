"""Images for the diffusion model: square padding, resizing, and the training views (colour
jitter and a horizontal flip, drawn from a seeded generator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.preprocess import resize_rgb

if TYPE_CHECKING:
    from pipeline.augment.lora_training import LoraTraining

def to_square(rgb: np.ndarray) -> np.ndarray:
    """Pad an (H, W, 3) image to a centred square with black (as prepare pads rgb)."""
    h, w = rgb.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return np.pad(rgb, ((top, s - h - top), (left, s - w - left), (0, 0)))


def colour_jitter(x: torch.Tensor, amounts: Sequence[float] | float,
                  generator: torch.Generator) -> torch.Tensor:
    """torchvision's ``ColorJitter(*amounts)`` on (3, H, W) in [0, 1], drawn from ``generator``.

    Factors and the random order of the four adjustments are drawn as ColorJitter draws them,
    but from a seeded generator instead of torch's global one (reproducible); the adjustments
    are torchvision's own functions.
    """
    from torchvision.transforms import functional as tvf

    values = [float(amounts)] * 3 if isinstance(amounts, (int, float)) else list(amounts)
    values = (values + [0.0] * 4)[:4]
    order = torch.randperm(4, generator=generator).tolist()
    draws = torch.rand(4, generator=generator).tolist()
    if not any(values):
        return x
    adjust = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)
    for i in order:
        if values[i] == 0:
            continue
        if i == 3:  # hue: a shift in [-h, h]
            factor = values[3] * (2.0 * draws[3] - 1.0)
        else:  # a factor in [max(0, 1 - a), 1 + a]
            low, high = max(0.0, 1.0 - values[i]), 1.0 + values[i]
            factor = low + (high - low) * draws[i]
        x = adjust[i](x, factor)
    return x.clamp(0.0, 1.0)


def augment_image(pixels: torch.Tensor, cfg: LoraTraining, generator: torch.Generator) -> torch.Tensor:
    """One training view in [-1, 1]: colour jitter, then a horizontal flip with prob. ``hflip``."""
    x = colour_jitter(pixels, cfg.color_jitter, generator)
    if float(torch.rand(1, generator=generator)) < cfg.hflip:
        x = x.flip(-1)
    return x * 2.0 - 1.0
