"""Estimated surface normals from RGB alone with Marigold (DESIGN 1.2 "Estimated normals").

Sign convention. Marigold predicts normals in a camera-aligned frame with X to the right, Y up
and Z towards the viewer (diffusers' ``visualize_normals`` documents this frame), so a surface
facing the camera is (0, 0, 1). Our real normals (``pipeline/normals.py``) live in the point
cloud's camera frame (X right, Y down, Z forward, away from the camera) and are oriented
towards the camera and then negated, so they point away from the camera: a surface facing the
camera is also (0, 0, 1). Writing a Marigold normal m in the camera frame gives
(m_x, -m_y, -m_z), pointing towards the camera; negating it gives (-m_x, m_y, m_z). So the two
conventions differ only in the sign of X, and :func:`marigold_to_pipeline_frame` flips it.
This matters because the estimated-stream 2D->3D prediction is compared with REAL normal
features at test time (DESIGN 1.6). ``tests/test_estimate_normals.py`` checks the mapping on
tilted planes against the real-normal definition.

Degenerate predictions (zero vectors, which a random demo model can produce) become (0, 0, 1),
the value of a surface facing the camera, so every stored normal has unit length.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.diffusion import ModelClock

_FACING = torch.tensor([0.0, 0.0, 1.0])
_FLIP_X = torch.tensor([-1.0, 1.0, 1.0])


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-image seed from the stage seed and the sample id, independent of batching."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def marigold_to_pipeline_frame(normals: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) Marigold normals (X right, Y up, Z to viewer) -> our real-normal frame."""
    return normals * _FLIP_X.to(normals.device, normals.dtype).view(1, 3, 1, 1)


def unit_normals(normals: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise (N, 3, H, W) to unit length; degenerate vectors become (0, 0, 1)."""
    # Sum of squares by hand: torch.norm over dim 1 of an NCHW tensor is ~100x slower on CPU.
    norm = (normals * normals).sum(dim=1, keepdim=True).sqrt()
    facing = _FACING.to(normals.device, normals.dtype).view(1, 3, 1, 1)
    return torch.where(norm > eps, normals / norm.clamp(min=eps), facing)


def resize_normals(normals: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, 3, H, W) normals to size x size, re-normalised to unit length."""
    if normals.shape[-2:] != (size, size):
        normals = F.interpolate(normals, size=(size, size), mode="bilinear", align_corners=False)
    return unit_normals(normals)


def encode(normals: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) unit normals -> (N, H, W, 3) float16 in [0, 1] as (n + 1) / 2."""
    enc = (normals * 0.5 + 0.5).clamp_(0.0, 1.0).to(torch.float16)  # half first: less to move
    return enc.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def model_input(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB images (B, H, W, 3) -> the pipeline's input, (B, 3, H, W) float in [0, 1]."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) RGB images, got {rgb.shape}")
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float() / 255.0


def marigold_prediction(
    pipe: Any,
    images: torch.Tensor,
    seeds: list[int],
    *,
    steps: int,
    ensemble: int,
    processing_resolution: int,
    clock: ModelClock | None = None,
) -> torch.Tensor:
    """Marigold's raw normals of :func:`model_input` images: (B, 3, h, w) float in Marigold's
    frame at the processing resolution (``processing_resolution`` 0: the input resolution).

    One seeded generator per ensemble member (``seeds`` has one seed per image), so an image's
    normals do not depend on which batch it falls in.
    """
    if len(seeds) != len(images):
        raise ValueError("one seed per image is required")
    device = pipe.unet.device
    generators = [
        torch.Generator(device=device).manual_seed((seed + 7919 * e) & 0x7FFF_FFFF_FFFF_FFFF)
        for seed in seeds
        for e in range(ensemble)
    ]
    clock = clock or ModelClock()
    with clock():
        out = pipe(
            images.to(device),
            num_inference_steps=steps,
            ensemble_size=ensemble,
            processing_resolution=processing_resolution,
            # We resize to S ourselves (one bilinear pass + renormalisation), so the pipeline
            # returns its prediction at the processing resolution.
            match_input_resolution=False,
            batch_size=len(images) * ensemble,
            generator=generators,
            output_type="pt",
        )
    return out.prediction


def finish_normals(prediction: torch.Tensor, out_size: int) -> np.ndarray:
    """Marigold's (B, 3, h, w) prediction -> encoded unit normals (B, S, S, 3) in our frame."""
    normals = marigold_to_pipeline_frame(prediction.float())
    return encode(resize_normals(normals, out_size))


def predict_normals(
    pipe: Any,
    rgb: np.ndarray,
    seeds: list[int],
    *,
    steps: int,
    ensemble: int,
    processing_resolution: int,
    out_size: int,
    clock: ModelClock | None = None,
) -> np.ndarray:
    """Marigold normals of a batch of uint8 RGB images (B, H, W, 3) -> encoded (B, S, S, 3).

    The three steps (:func:`model_input`, :func:`marigold_prediction`,
    :func:`finish_normals`) are separate so the stage can run the first and last on helper
    threads while the model works on another batch.
    """
    images = model_input(rgb)
    if len(seeds) != len(rgb):
        raise ValueError("one seed per image is required")
    if len(rgb) == 0:
        return np.zeros((0, out_size, out_size, 3), dtype=np.float16)
    prediction = marigold_prediction(
        pipe, images, seeds, steps=steps, ensemble=ensemble,
        processing_resolution=processing_resolution, clock=clock,
    )
    return finish_normals(prediction, out_size)
