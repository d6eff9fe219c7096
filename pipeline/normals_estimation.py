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

The flip is a setting (``flip_x``): the published code stores Marigold's frame as it is
(OFFICIAL.md item 6), and its released mappers expect that.

Two ways to finish a prediction (``output``):

* ``float``: Marigold's prediction at the processing resolution is resized bilinearly to the
  working size S and re-normalised; degenerate vectors (zero, which a random demo model can
  produce) become (0, 0, 1), so every stored normal has unit length.
* ``uint8``, the published one (OFFICIAL.md item 5): the ensembled prediction is resized back
  to the input size (bilinear, antialiased), clipped to [-1, 1] and quantised to uint8 as
  ``((n + 1) * 127.5)`` truncated, which is what the published PNGs hold; that image is then
  resized to S with PIL's bilinear filter (what torchvision's ``Resize`` does to the PNG when
  the published training loads it) and stored as ``q / 255``. These vectors are not
  re-normalised, as in the published code. The x flip is applied last, on the uint8 values
  (``255 - q``), so the two frames differ exactly by the sign of x.

Seeding (``seeding``): ``per_sample`` seeds each ensemble member from the stage seed and the
sample id, so an image's normals depend neither on batching nor on other images;
``same_per_image`` is the published handling: every image gets a fresh generator seeded with
the stage seed, from which its ensemble members' noise is drawn one member after the other
(the published batch size 1), so every image of a size starts from the same noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import ParamsError
from pipeline.models.diffusion import ModelClock

_FACING = torch.tensor([0.0, 0.0, 1.0])
_FLIP_X = torch.tensor([-1.0, 1.0, 1.0])


PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # estimate_normals.precision


@dataclass(frozen=True)
class MarigoldRun:
    """How Marigold runs and how its prediction becomes stored normals (params.yaml
    ``estimate_normals``, with the processing resolution already resolved to an int)."""

    steps: int
    ensemble: int
    processing_resolution: int  # 0 = the input resolution
    reduction: Literal["closest", "mean"] = "closest"
    seeding: Literal["per_sample", "same_per_image"] = "per_sample"
    output: Literal["float", "uint8"] = "float"
    flip_x: bool = True
    # Images per UNet call, counting every ensemble member; 0 = all members of all the images
    # of a call at once (the stage). The published script runs them one at a time (1): the
    # noise is the same either way, only the batching differs.
    batch_size: int = 0
    # "float": diffusers resizes the [0, 1] image; "uint8": resized here as the published
    # Marigold code does (see :func:`resize_like_published`), the pipeline gets it as it is
    input_resize: Literal["float", "uint8"] = "float"

    @classmethod
    def of(cls, p: Any, processing_resolution: int) -> MarigoldRun:
        """The run of the ``estimate_normals`` parameters ``p`` (the stage and ``predict``)."""
        return cls(steps=p.steps, ensemble=p.ensemble, processing_resolution=processing_resolution,
                   reduction=p.reduction, seeding=p.seeding, output=p.output, flip_x=p.flip_x,
                   input_resize=p.input_resize)


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-image seed from the stage seed and the sample id, independent of batching."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def image_seeds(seed: int, sample_ids: list[str], seeding: str) -> list[int]:
    """The seed of each image: derived from its id, or the stage seed itself (published)."""
    if seeding == "same_per_image":
        return [seed] * len(sample_ids)
    return [sample_seed(seed, i) for i in sample_ids]


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


def latent_size(pipe: Any, height: int, width: int, processing_resolution: int) -> tuple[int, int]:
    """The latent grid the pipeline uses for an input of height x width: resized so that the
    longer edge is the processing resolution (0: kept), padded to the VAE's scale factor."""
    if processing_resolution > 0:
        longer = max(height, width)
        height = height * processing_resolution // longer
        width = width * processing_resolution // longer
    f = pipe.vae_scale_factor
    return (height + f - 1) // f, (width + f - 1) // f


def resize_like_published(images: torch.Tensor, processing_resolution: int) -> torch.Tensor:
    """(B, 3, H, W) [0, 1] images of uint8 values resized as the published Marigold code
    resizes its uint8 input tensor: torchvision's antialiased bilinear to a longer edge of
    ``processing_resolution`` (``int`` of the scaled edges), rounded to uint8; returned in
    [0, 1] again. 0 keeps the size."""
    from torchvision.transforms.functional import InterpolationMode, resize

    height, width = images.shape[-2:]
    if processing_resolution <= 0:
        return images
    scale = min(processing_resolution / width, processing_resolution / height)
    size = [int(height * scale), int(width * scale)]
    as_uint8 = (images * 255.0).round().to(torch.uint8)
    resized = resize(as_uint8, size, InterpolationMode.BILINEAR, antialias=True)
    return resized.float() / 255.0


def _noise(pipe: Any, images: torch.Tensor, seeds: list[int], run: MarigoldRun,
           device: torch.device) -> dict[str, Any]:
    """The pipeline's noise argument: seeded generators, or the latents themselves."""
    if run.seeding == "per_sample":
        # One generator per ensemble member: an image's noise does not depend on its batch.
        return {"generator": [
            torch.Generator(device=device).manual_seed((seed + 7919 * e) & 0x7FFF_FFFF_FFFF_FFFF)
            for seed in seeds
            for e in range(run.ensemble)
        ]}
    h, w = latent_size(pipe, images.shape[-2], images.shape[-1], run.processing_resolution)
    shape = (pipe.vae.config.latent_channels, h, w)
    return {"latents": torch.cat([published_member_noise(seed, run.ensemble, shape, device,
                                                         pipe.dtype) for seed in seeds])}


def published_member_noise(seed: int, ensemble: int, shape: tuple[int, int, int],
                           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The published initial noise of one image's ensemble, (E, C, h, w): a fresh generator
    seeded with ``seed``, then one (1, C, h, w) draw per member in turn, since the published
    script runs Marigold with batch size 1 (OFFICIAL 18). One (E, C, h, w) draw would be other
    numbers: a generator's stream is not split the same way across one large draw."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([torch.randn((1, *shape), generator=gen, device=device, dtype=dtype)
                      for _ in range(ensemble)])


def marigold_prediction(
    pipe: Any,
    images: torch.Tensor,
    seeds: list[int],
    run: MarigoldRun,
    clock: ModelClock | None = None,
) -> torch.Tensor:
    """Marigold's ensembled normals of :func:`model_input` images of one size: (B, 3, h, w)
    float in Marigold's frame at the processing resolution. ``seeds``: one per image
    (:func:`image_seeds`)."""
    if len(seeds) != len(images):
        raise ValueError("one seed per image is required")
    device = pipe.unet.device
    clock = clock or ModelClock()
    if run.input_resize == "uint8":
        images = resize_like_published(images, run.processing_resolution)
        run = dataclasses.replace(run, processing_resolution=0)  # the pipeline keeps the size
    with clock():
        out = pipe(
            images.to(device),
            num_inference_steps=run.steps,
            ensemble_size=run.ensemble,
            processing_resolution=run.processing_resolution,
            ensembling_kwargs={"reduction": run.reduction},
            # We resize ourselves (see the module docstring), so the pipeline returns its
            # prediction at the processing resolution.
            match_input_resolution=False,
            batch_size=run.batch_size or len(images) * run.ensemble,
            output_type="pt",
            **_noise(pipe, images, seeds, run, device),
        )
    return out.prediction


def quantize(normals: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) normals -> (N, H, W, 3) uint8 as the published PNGs: clipped to [-1, 1],
    then ``(n + 1) * 127.5`` truncated."""
    q = ((normals.clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)  # the cast truncates
    return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def resize_uint8_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) with PIL's bilinear filter (what the published
    training's torchvision ``Resize`` does to a PNG it loads)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return out


def finish_normals(prediction: torch.Tensor, input_size: int, out_size: int,
                   run: MarigoldRun) -> np.ndarray:
    """Marigold's (B, 3, h, w) prediction of input_size x input_size images -> stored normals
    (B, S, S, 3) float16 in [0, 1] (see the module docstring for the two ``output`` modes)."""
    prediction = prediction.float()
    if run.output == "float":
        normals = marigold_to_pipeline_frame(prediction) if run.flip_x else prediction
        return encode(resize_normals(normals, out_size))
    if prediction.shape[-2:] != (input_size, input_size):
        prediction = F.interpolate(prediction, size=(input_size, input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
    q = resize_uint8_bilinear(quantize(prediction), out_size)
    if run.flip_x:
        q[..., 0] = 255 - q[..., 0]
    return (q.astype(np.float32) / 255.0).astype(np.float16)


def predict_normals(
    pipe: Any,
    rgb: np.ndarray,
    seeds: list[int],
    run: MarigoldRun,
    out_size: int,
    clock: ModelClock | None = None,
) -> np.ndarray:
    """Marigold normals of a batch of square uint8 RGB images (B, R, R, 3) -> (B, S, S, 3).

    The three steps (:func:`model_input`, :func:`marigold_prediction`,
    :func:`finish_normals`) are separate so the stage can run the first and last on helper
    threads while the model works on another batch.
    """
    if len(seeds) != len(rgb):
        raise ValueError("one seed per image is required")
    if len(rgb) == 0:
        return np.zeros((0, out_size, out_size, 3), dtype=np.float16)
    prediction = marigold_prediction(pipe, model_input(rgb), seeds, run, clock=clock)
    return finish_normals(prediction, rgb.shape[1], out_size, run)


def resolve_resolution(pipe: Any, value: int | None, spec: str) -> int:
    """``estimate_normals.processing_resolution``: null = the model's default."""
    key = "estimate_normals.processing_resolution"
    if value is None:
        default = pipe.default_processing_resolution
        if not isinstance(default, int) or default < 0:
            raise ParamsError(f"{key}: null asks for the model's default, but {spec} has no "
                              "default_processing_resolution in its config; give a number")
        return default
    if value % pipe.vae_scale_factor:
        raise ParamsError(
            f"{key}: {value} is not a multiple of the VAE's scale factor {pipe.vae_scale_factor} "
            f"({spec}); 0 = input resolution, null = the model's default"
        )
    return value
