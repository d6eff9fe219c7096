"""The one config source: ``params.yaml``, one section per stage, validated at stage start.

Every model forbids unknown keys, so a typo fails with a message naming the key. Errors are
raised as :class:`ParamsError` with the dotted key path, e.g. ``score.fusion``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ParamsError
from pipeline.limits import memory_problems

MVTEC3D_CATEGORIES = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel",
    "foam", "peach", "potato", "rope", "tire",
)
EYECANDIES_CATEGORIES = (
    "CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear",
    "HazelnutTruffle", "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy",
)
# the demo generator's categories (pipeline.data.demo.CATEGORIES; a test keeps them equal)
DemoCategory = Literal["disc", "dome", "slab"]


# Strict scalars: YAML's 1.0 or true is never taken for a count or a flag (DVC would name
# instances disc-1.0-0 or disc-True-0, and two spellings would write one output).
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict()]  # an integer is a valid float; true and "0.5" are not
Seed = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
# A category becomes a folder and file name and a DVC stage key: one plain name.
NAME = re.compile(r"[^\W_][\w.+-]*")
NAME_RULE = ("a plain name: letters, digits and '_', '-', '.', '+', starting with a letter or a "
             "digit; no '/', no '..', at most 100 characters")


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a single path part (a category), or None."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value \
            or len(value) > 100:
        return f"{short(value)} is not {NAME_RULE}"
    return None


def _plain_names(names: list[str]) -> list[str]:
    problem = next(filter(None, map(name_problem, names)), None)  # the value is in its text
    if problem:
        raise ValueError(problem)
    return names


def short(value: Any, width: int = 40) -> str:
    """``repr(value)`` cut to about ``width`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width - 3]}..."


class Section(BaseModel):
    # NaN and infinity pass ``ge``/``gt`` bounds in odd ways; no parameter needs them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Lists that are sets: a repeated entry would run the same work twice and count it twice
# (double rows in the summary and its mean). Checked across sections by Params.
SET_KEYS = (
    "data.categories",
    "demo_data.categories",
    "fewshot.shots",
    "fewshot.seeds",
    "evaluate.limits",
    "augment.lora_targets",
    "score.large_box_categories",
)


class DataParams(Section):
    """``data``: which dataset and the preprocessing (DESIGN 1.1)."""

    # folder: your own data in the layout of pipeline/data/folder.py
    dataset: Literal["mvtec3d", "eyecandies", "folder"] = "mvtec3d"
    root: str = "data/demo"
    categories: list[str] = Field(min_length=1)
    size: Int = Field(224, ge=16)
    plane_border: Int = Field(10, ge=1)
    plane_distance: Float = Field(0.005, gt=0)
    ransac_iterations: Int = Field(200, ge=1)
    cluster_eps: Float = Field(0.006, gt=0)
    cluster_min_points: Int = Field(30, ge=1)
    seed: Seed = 0
    # The plane fit: inlier distance while fitting (None = plane_distance; published 0.004,
    # points are then removed within plane_distance) and points per RANSAC hypothesis
    # (published 50, least-squares fitted, as Open3D's segment_plane(ransac_n=50)).
    ransac_threshold: Float | None = Field(None, gt=0)
    ransac_sample: Int = Field(3, ge=3)
    clean_xyz: Bool = True  # plane removal + clustering of the xyz (published Eyecandies: none)
    eyecandies_xyz: Literal["camera", "published"] = "camera"
    # With eyecandies_xyz published: the background pixels' xyz. zero: 0 (clean); published:
    # the constant non-zero point the published converter leaves there, which its foreground
    # test and real-normal script then take for object points (docs/reproducing.md, row 20).
    eyecandies_background: Literal["zero", "published"] = "zero"
    foreground: Literal["dilated", "published"] = "dilated"
    # RGB to data.size (prepare) and generated images to data.size (augment): PIL's filters;
    # bilinear = torchvision's default Resize, the published one (OFFICIAL 16)
    rgb_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    normals: Literal["grid", "published"] = "grid"
    normals_radius: Float = Field(0.01, gt=0)
    normals_max_neighbours: Int = Field(30, ge=3)
    normals_plane_distance: dict[str, Float] = Field(default={"default": 0.005})
    # A defective test sample (a defect-type folder other than good/) whose mask marks no
    # pixel is refused by prepare unless this is true (a dataset that really has such samples).
    accept_empty_defect_masks: Bool = False

    @field_validator("categories")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return _plain_names(v)

    @model_validator(mode="after")
    def _background(self) -> DataParams:
        if self.eyecandies_background == "published" and (
                self.dataset != "eyecandies" or self.eyecandies_xyz != "published"):
            raise ValueError("data.eyecandies_background: published is the published Eyecandies "
                             "converter's background; it needs data.dataset: eyecandies and "
                             "data.eyecandies_xyz: published")
        return self

    @field_validator("normals_plane_distance")
    @classmethod
    def _plane_distances(cls, v: dict[str, float]) -> dict[str, float]:
        if "default" not in v:
            raise ValueError("needs a 'default' entry (e.g. {default: 0.005, dowel: 0.002})")
        bad = [k for k, d in v.items() if not d > 0]
        if bad:
            raise ValueError(f"distances must be > 0 (got {', '.join(bad)})")
        return v


class DemoDataParams(Section):
    """``demo_data``: the embedded synthetic dataset that the ``demo_data`` stage writes to
    ``data/demo/<category>`` (one stage instance per entry; none with ``categories: []``, as in
    the presets for real datasets)."""

    categories: list[DemoCategory] = Field(default=["disc", "dome", "slab"])
    n_train: int = Field(10, ge=1)
    n_test: int = Field(24, ge=2)  # at least one good and one defective test image
    seed: int = 0


class FewshotParams(Section):
    """``fewshot``: the shots k, seeds and how shots are chosen."""

    shots: list[Int] = Field(default=[1, 2, 4], min_length=1)
    seeds: list[Seed] = Field(default=[0], min_length=1)
    strategy: Literal["first", "random"] = "first"

    @field_validator("shots")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every k must be >= 1")
        return v


class ModelsParams(Section):
    """``models``: a hub id, a local path, or a built-in ``demo:`` model for each role."""

    diffusion: str = "demo:tiny-sd"
    normals: str = "demo:tiny-marigold"
    backbone: str = "efficientnet_lite0"
    cache_dir: str = ".cache/models"


class TextualInversionParams(Section):
    """``augment.textual_inversion``: learning the placeholder token, phase 1 of pivotal tuning
    (the fields of ``pipeline.augment.lora_training.TextualInversion``, the token aside)."""

    steps: Int = Field(0, ge=0)  # micro-steps (one image each); 0 = no inversion phase
    lr: Float = Field(2e-3, gt=0)
    accumulation: Int = Field(1, ge=1)  # micro-steps per optimiser step
    init_std: Float = Field(0.017, ge=0)
    norm_target: Float = Field(0.0, ge=0)  # clip_ti_decay target norm; 0 = off
    continue_lr: Float = Field(0.0, ge=0)  # the row keeps learning with LoRA; 0 = it freezes


# augment's flat textual-inversion keys before they became one section (issue 24)
RENAMED_AUGMENT_KEYS = {
    "textual_inversion_steps": "steps", "textual_inversion_lr": "lr",
    "textual_inversion_accumulation": "accumulation", "textual_inversion_init_std": "init_std",
    "textual_inversion_norm": "norm_target", "continue_inversion_lr": "continue_lr",
}


class AugmentParams(Section):
    """``augment``: pivotal tuning (textual inversion, then LoRA) and img2img (DESIGN 1.3).

    The published values (lora_pti, scripts/train_lora_mvtec3dad.py and
    generate_rgb_mvtec3dad.py) are in presets/paper.yaml; the defaults here are the plain
    LoRA recipe of the demo.
    """

    # train: pivotal tuning here; official: the released lora_pti file
    # <lora_checkpoints>/<category>/final_lora.safetensors, converted (pipeline/augment/lora_pti.py).
    # `lora_checkpoints` is always a path: upstream/dvc.yaml lists it as augment's dependency.
    lora: Literal["train", "official"] = "train"
    lora_checkpoints: str = Field("checkpoints", min_length=1)
    train_on: Literal["shots", "train_split"] = "shots"
    # Where the shots' images come from: the dataset's original RGB padded to a square
    # (published), or the prepare store's data.size crop (upscaled to the resolution).
    image_source: Literal["original", "prepared"] = "prepared"
    n_per_shot: Int = Field(5, ge=0)
    lora_rank: Int = Field(8, ge=1)
    lora_targets: list[str] = Field(default=["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    train_text_encoder: Bool = False
    lr: Float = Field(1e-4, gt=0)  # UNet LoRA learning rate (after any scaling)
    text_encoder_lr: Float | None = Field(None, gt=0)  # None: the same as lr
    weight_decay: Float = Field(1e-2, ge=0)  # AdamW of the LoRA phase
    lr_schedule: Literal["constant", "linear"] = "constant"
    lr_warmup_steps: Int = Field(0, ge=0)
    grad_clip: Float = Field(0.0, ge=0)  # max gradient norm; 0 = off
    timestep_fraction: Float = Field(1.0, gt=0, le=1)  # LoRA steps draw t < fraction * T
    steps: Int = Field(1000, ge=1)
    resolution: Int = Field(512, ge=8)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # training resize
    color_jitter: list[Float] = Field(default=[0.05, 0.05, 0.05], min_length=1, max_length=4)
    hflip: Float = Field(0.0, ge=0, le=1)
    cache_latents: Bool = False  # augment, caption and encode each image once (lora_pti)
    train_prompts: Literal["fixed", "object"] = "fixed"  # the prompt, or the object templates
    placeholder_token: str = "sks"  # may contain {category}
    textual_inversion: TextualInversionParams = TextualInversionParams()
    prompt: str = "a photo of sks {category}"  # may contain {category} and {token}
    strength: Float = Field(0.2, gt=0, le=1)
    guidance: Float = Field(4.0, ge=0)
    inference_steps: Int = Field(50, ge=1)
    image_seeds: list[Seed] = Field(default=[])  # [] = seeds derived per image
    generator_device: Literal["cpu", "device"] = "cpu"
    precision: Literal["float16", "float32"] = "float16"  # generation on CUDA (CPU: float32)
    train_precision: Literal["float16", "float32"] = "float16"  # base weights, training on CUDA
    seed: Seed = 0

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        old = [key for key in RENAMED_AUGMENT_KEYS if isinstance(data, dict) and key in data]
        if old:
            raise ValueError("\n".join(
                f"augment.{key}: now augment.textual_inversion.{RENAMED_AUGMENT_KEYS[key]} (the "
                "textual inversion keys are one section: textual_inversion: {steps: ..., ...})"
                for key in old))
        return data

    @model_validator(mode="after")
    def _generation(self) -> AugmentParams:
        if self.n_per_shot == 0:  # nothing is generated: the templates and steps are unused
            return self
        if int(self.inference_steps * self.strength) < 1:
            raise ValueError(f"augment.strength: {self.strength} x augment.inference_steps "
                             f"{self.inference_steps} leaves no denoising step (needs >= 1)")
        token = _template(self.placeholder_token, "augment.placeholder_token", category="x")
        if token.split() != [token]:
            raise ValueError(f"augment.placeholder_token: {short(self.placeholder_token)} must "
                             "be one word (no spaces)")
        _template(self.prompt, "augment.prompt", category="x", token=token)
        return self

    @field_validator("color_jitter")
    @classmethod
    def _jitter_range(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v) or any(x > 1 for x in v[:3]) or (len(v) == 4 and v[3] > 0.5):
            raise ValueError("[brightness, contrast, saturation, hue]: each >= 0, the first "
                             "three <= 1, hue <= 0.5")
        return v

    @model_validator(mode="after")
    def _seeds_cover_images(self) -> AugmentParams:
        if self.image_seeds and self.n_per_shot > len(self.image_seeds):
            raise ParamsError(
                f"augment.image_seeds: {len(self.image_seeds)} seeds for augment.n_per_shot "
                f"{self.n_per_shot} images per shot (give at least n_per_shot, or [])"
            )
        return self

    def learns_token(self) -> bool:
        return self.textual_inversion.steps > 0 or self.textual_inversion.continue_lr > 0


def _template(template: str, key: str, **values: str) -> str:
    """``template`` filled with ``values``; a field other than those is a ValueError."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ValueError(f"{key}: bad template {short(template)} ({err}; allowed fields: "
                         f"{', '.join('{' + k + '}' for k in values)})") from None


class EstimateNormalsParams(Section):
    """``estimate_normals``: Marigold normals from RGB (DESIGN 1.2)."""

    # prepared: the data.size RGB of the prepare store / generated.zarr `rgb` (fast);
    # original: the dataset's RGB padded to a square / generated.zarr `rgb_full` (published).
    input: Literal["prepared", "original"] = "prepared"
    # null: the model's default (published), 0: the input resolution, N: longer edge N.
    processing_resolution: Int | None = Field(0, ge=0)
    # How the input reaches the processing resolution: float = diffusers' pipeline (the [0, 1]
    # image, antialiased bilinear, not rounded); uint8 = the published Marigold code (the uint8
    # image resized by torchvision, antialiased bilinear, rounded to uint8).
    input_resize: Literal["float", "uint8"] = "float"
    # auto: fp16 on CUDA, fp32 on a CPU; the published run is fp32.
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    steps: Int = Field(10, ge=1)
    ensemble: Int = Field(10, ge=1)
    reduction: Literal["closest", "mean"] = "closest"  # Marigold's ensembling
    # float: bilinear to data.size at once, re-normalised, float16 (fast); uint8: resized back
    # to the input size, quantised to uint8 as the published PNGs, then bilinear to data.size.
    output: Literal["float", "uint8"] = "float"
    # true: Marigold's x flipped into the real-normal frame; false: Marigold's frame (published).
    flip_x: Bool = True
    # per_sample: one seed per (image id, ensemble member) from `seed`; same_per_image: every
    # image's noise from a fresh generator seeded with `seed` (published).
    seeding: Literal["per_sample", "same_per_image"] = "per_sample"
    batch_size: Int = Field(1, ge=1)
    seed: Seed = 0


class ExtractFeaturesParams(Section):
    """``extract_features``: the frozen backbone and its three layers (DESIGN 1.4)."""

    layers: list[Int] = Field(default=[4, 7, 11], min_length=3, max_length=3)
    batch_size: Int = Field(8, ge=1)
    noisy_copies: Int = Field(0, ge=0)
    noise_sigma: Float = Field(0.01, ge=0)
    # Where the RGB noise of the noisy copies is added: "normalised" = after ImageNet
    # normalisation (published, OFFICIAL 10), "image" = in [0, 1] before it. Normal images are
    # not normalised, so for them both are the same.
    noise_space: Literal["normalised", "image"] = "image"
    # The backbone's forward precision: fp32 (published, OFFICIAL 13), fp16, or auto = fp16 on
    # CUDA and fp32 on the CPU.
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    # The stored features: float16 (half the store) or float32 (the published training's
    # precision, OFFICIAL 17)
    feature_dtype: Literal["float16", "float32"] = "float16"
    seed: Seed = 0

    @field_validator("layers")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)) or v[0] < 0:
            raise ValueError(f"must be three increasing block indices >= 0, e.g. [4, 7, 11] "
                             f"(got {short(v)})")
        return v


class FitMapperParams(Section):
    """``fit_mapper``: the four cross-modal mappers per category and k (DESIGN 1.5)."""

    architecture: Literal["cahfm", "mlp"] = "cahfm"
    resolution: Int = Field(224, ge=1)
    # keys lax: a YAML or JSON writer may quote them ("1"); the k themselves are fewshot.shots
    steps: dict[int, Int] = Field(default={1: 3000, 2: 1500, 4: 750})
    lr: Float = Field(1e-4, gt=0)
    lr_min: Float = Field(1e-6, ge=0)
    weight_decay: Float = Field(1e-4, ge=0)
    layer_weights: list[Float] = Field(default=[1.2, 1.0, 0.8], min_length=3, max_length=3)
    batch_size: Int = Field(1, ge=1)
    # Which side of a mapper gets the noisy copies: "source" (its input only, targets clean:
    # published, OFFICIAL 10) or "both" (input and target).
    noise_on: Literal["source", "both"] = "both"
    # copies: pick one of extract_features.noisy_copies stored noisy encodings (fast, cached);
    # online: fresh N(0, extract_features.noise_sigma) noise every step through the frozen
    # backbone, the published training (OFFICIAL 15; costs a backbone forward per step)
    noise: Literal["copies", "online"] = "copies"
    # train: fit the mappers; official: convert the released checkpoints found under
    # `checkpoints` (pipeline/official.py) instead. `checkpoints` is always a path because
    # upstream/dvc.yaml lists it as a dependency, so DVC hashes the files (docs/reproducing.md).
    mappers: Literal["train", "official"] = "train"
    checkpoints: str = Field("checkpoints", min_length=1)
    # DVC cannot branch on a value, so each route's stages run once per entry of its own
    # list (upstream/dvc.yaml): trained_seeds drives augment, the generated-image stages and
    # fit_mapper; released_seeds drives fit_mapper_released (the conversion, which reads no
    # generated image). The route `mappers` names lists fewshot.seeds, the other [];
    # None (a params file without the key) means exactly that.
    trained_seeds: list[Seed] | None = None
    released_seeds: list[Seed] | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _schedule(self) -> FitMapperParams:
        if self.lr_min > self.lr:
            raise ValueError(f"fit_mapper.lr_min: {self.lr_min} is above fit_mapper.lr="
                             f"{self.lr} (the cosine schedule decays from lr to lr_min)")
        return self

    def steps_for(self, k: int) -> int:
        if k not in self.steps:
            raise ParamsError(
                f"fit_mapper.steps: no step count for k={k} (given for k in {sorted(self.steps)})"
            )
        return self.steps[k]


# The feature setup the released checkpoints were trained and tested with (OFFICIAL.md,
# "Released checkpoints"): a preset with fit_mapper.mappers = official must use it.
OFFICIAL_SETUP: dict = {
    "backbone": "vit_base_patch8_224.dino",
    "layers": [4, 7, 11],
    "resolution": 224,
    "architecture": "cahfm",
    "distance": "concatenated",
    "size": 224,
}

CHECKPOINT_FOLDERS = ("checkpoints_dual_", "checkpoints_eyecandies_dual_")  # the release's


def _holds_checkpoints(folder: Path) -> bool:
    """Released mapper folders directly in ``folder`` or in its checkpoints/ (top level only:
    a folder given by mistake may be huge)."""
    for base in (folder, folder / "checkpoints"):
        if base.is_dir() and any(e.name.startswith(CHECKPOINT_FOLDERS) and e.is_dir()
                                 for e in base.iterdir()):
            return True
    return False


def checkpoint_problems(params: Params) -> list[str]:
    """``fit_mapper.checkpoints`` is a DVC dependency of every fit_mapper instance (DVC hashes
    all of it): released checkpoints or the in-repo placeholder (a README), nothing else."""
    raw, official = params.fit_mapper.checkpoints, params.fit_mapper.mappers == "official"
    key, folder = f"fit_mapper.checkpoints: {short(raw)}", Path(raw)
    layout = ("checkpoints_dual_<2dto3d|3dto2d>_<class>_<k>shot/ folders, directly or under "
              "checkpoints/")
    if not folder.exists():  # DVC names a missing dependency; official mappers need it now
        return [f"{key} not found (fit_mapper.mappers=official reads {layout} there)"] \
            if official else []
    if not folder.is_dir():
        return [f"{key} is a file; give the folder of the released checkpoints ({layout})"]
    here, target = Path.cwd().resolve(), folder.resolve()
    if target == here or target in here.parents:
        return [f"{key} is the project folder or one that holds it; give the folder of the "
                f"released checkpoints ({layout}) or keep the default checkpoints/"]
    if _holds_checkpoints(folder):
        return []
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if not official and all(e.is_file() and e.name.lower().startswith("readme") for e in entries):
        return []  # the in-repo placeholder
    return [f"{key} holds no released checkpoints ({layout})"
            + ("" if official else " and is not the in-repo placeholder (only a README)")]


# fit_mapper keys that pick the graph's route, not what a stage computes: the stages that
# train mappers neither declare nor record them (adding a seed re-runs no trained mapper);
# fit_mapper_released declares and records mappers and checkpoints.
ROUTE_KEYS = ("mappers", "checkpoints", "trained_seeds", "released_seeds")


def route_problems(params: Params) -> list[str]:
    """``fit_mapper.trained_seeds`` / ``released_seeds`` (the DVC graph's two routes) must
    follow ``fit_mapper.mappers``: fewshot.seeds in its route, [] in the other."""
    f, seeds = params.fit_mapper, list(params.fewshot.seeds)
    want = {"trained_seeds": seeds if f.mappers == "train" else [],
            "released_seeds": seeds if f.mappers == "official" else []}
    got = {"trained_seeds": f.trained_seeds, "released_seeds": f.released_seeds}
    wrong = [k for k in want if got[k] is not None and list(got[k]) != want[k]]
    if not wrong:
        return []
    fix = " ".join(f"fit_mapper.{k}={json.dumps(v)}" for k, v in want.items())
    return [f"fit_mapper.{k}: {got[k]} does not follow fit_mapper.mappers={f.mappers} and "
            f"fewshot.seeds={seeds} (the {'trained' if k == 'trained_seeds' else 'released'}-"
            f"mapper stages run once per entry; set {fix})" for k in wrong]


LORA_RELEASE_FILE = "final_lora.safetensors"  # lora_pti's last save, one per category


def lora_checkpoint_problems(params: Params) -> list[str]:
    """``augment.lora_checkpoints`` is a DVC dependency of every augment instance: with
    ``augment.lora: official`` it must hold ``<category>/final_lora.safetensors`` for every
    category that generates images (not with released mappers: augment then generates none)."""
    a, raw = params.augment, params.augment.lora_checkpoints
    key, folder = f"augment.lora_checkpoints: {short(raw)}", Path(raw)
    generates = a.n_per_shot > 0 and params.fit_mapper.mappers == "train"
    if not folder.exists():
        return [f"{key} not found (augment.lora=official reads <category>/{LORA_RELEASE_FILE} "
                "there)"] if a.lora == "official" and generates else []
    if not folder.is_dir():
        return [f"{key} is a file; give the folder of the released LoRA files"]
    here, target = Path.cwd().resolve(), folder.resolve()
    if target == here or target in here.parents:
        return [f"{key} is the project folder or one that holds it; give the folder of the "
                "released LoRA files or keep the default checkpoints/"]
    if a.lora != "official" or not generates:
        return []
    missing = [c for c in params.data.categories if not (folder / c / LORA_RELEASE_FILE).is_file()]
    return [f"{key}: no {c}/{LORA_RELEASE_FILE} (augment.lora=official, data.categories has {c})"
            for c in missing]


def official_setup_issues(params: Params) -> list[str]:
    """Keys that differ from the setup the official checkpoints need (empty when consistent)."""
    if params.fit_mapper.mappers != "official":
        return []
    need = OFFICIAL_SETUP
    issues = []
    if params.models.backbone.split("@")[0] != need["backbone"]:
        issues.append(f"models.backbone={params.models.backbone!r} (need {need['backbone']}, "
                      f"or {need['backbone']}@<weights file>)")
    checks = (
        ("extract_features.layers", params.extract_features.layers, need["layers"]),
        ("fit_mapper.resolution", params.fit_mapper.resolution, need["resolution"]),
        ("fit_mapper.architecture", params.fit_mapper.architecture, need["architecture"]),
        ("infer.distance", params.infer.distance, need["distance"]),
        ("data.size", params.data.size, need["size"]),
    )
    issues += [f"{key}={got!r} (need {want!r})" for key, got, want in checks if got != want]
    if params.estimate_normals.flip_x:
        issues.append("estimate_normals.flip_x=True (need false: the official mappers saw "
                      "Marigold's own frame)")
    return issues


class InferParams(Section):
    """``infer``: mapper inference on the test set, the four raw stream maps (DESIGN 1.6)."""

    batch_size: Int = Field(8, ge=1)
    # layerwise: 1 - cos over the concatenation of per-layer unit-normalised features (the mean
    # of the per-layer cosine distances the mappers are trained on); concatenated: 1 - cos of
    # the L2-normalised concatenated vectors (the published code, OFFICIAL item 1), whose
    # result the untrained predicted layer norms dominate.
    distance: Literal["layerwise", "concatenated"] = "layerwise"
    # The stored stream maps: float32 as the published code keeps them through fusion and
    # the metrics (OFFICIAL 17); float16 halves the store but ties close scores.
    map_dtype: Literal["float32", "float16"] = "float32"


class ScoreParams(Section):
    """``score``: stream fusion, smoothing and normalisation (DESIGN 1.6)."""

    lambda_1: Float = Field(0.1, ge=0)
    lambda_2: Float = Field(0.1, ge=0)
    fusion: Literal["product", "sum", "max"] = "product"
    modalities: Literal["both", "2d", "3d"] = "both"
    streams: Literal["both", "real", "estimated"] = "both"
    smoothing: Literal["box", "gaussian"] = "box"
    box_sizes: tuple[Int, Int] = (3, 5)
    box_sizes_large: tuple[Int, Int] = (5, 7)
    large_box_categories: list[str] = Field(
        default=["carrot", "cookie", "peach", "potato", "rope", "HazelnutTruffle"]
    )
    gaussian_sigma: Float = Field(4.0, gt=0)
    batch_size: Int = Field(8, ge=1)

    @field_validator("box_sizes", "box_sizes_large")
    @classmethod
    def _odd(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(w < 1 or w % 2 == 0 for w in v):
            raise ValueError("box sizes must be odd and positive: the box is centred on a pixel")
        return v

    @field_validator("large_box_categories")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return _plain_names(v)

    def box_for(self, category: str) -> tuple[int, int]:
        return self.box_sizes_large if category in self.large_box_categories else self.box_sizes


class EvaluateParams(Section):
    """``evaluate``: metrics, tables and pictures (DESIGN 1.7).

    AUPRO is always computed exactly and, in the same pass, with the published approximation
    for every threshold count in ``aupro_thresholds``; ``headline_aupro`` only chooses which
    of them the report's tables show as *the* AUPRO.
    """

    limits: list[Float] = Field(default=[0.3, 0.1, 0.05, 0.01], min_length=1)
    # threshold counts of the published approximation, each reported next to the exact value
    aupro_thresholds: list[Int] = Field(default=[99])
    # exact | thr<T> (T in aupro_thresholds): the AUPRO the summary tables lead with
    headline_aupro: str = Field("exact", pattern=r"^(exact|thr[0-9]+)$")
    heatmaps_per_class: Int = Field(3, ge=0)

    @field_validator("limits")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if any(not 0 < x <= 1 for x in v):
            raise ValueError("every limit must be in (0, 1]")
        return v

    @field_validator("aupro_thresholds", mode="before")
    @classmethod
    def _was_a_single_choice(cls, v: object) -> object:
        # Before issue 14 this key chose ONE computation (null = exact, 99 = approximation).
        if v is None or isinstance(v, (int, float, str)):
            raise ValueError(
                "now a list of threshold counts whose approximation is reported NEXT TO the "
                "exact AUPRO, which is always computed (e.g. [99]); an old `null` becomes [99], "
                "an old `99` becomes [99] plus `evaluate.headline_aupro: thr99`"
            )
        return v

    @field_validator("aupro_thresholds")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if any(t < 2 for t in v):
            raise ValueError("every threshold count must be >= 2")
        if len(set(v)) != len(v):
            raise ValueError("threshold counts repeat")
        return v

    @field_validator("headline_aupro")
    @classmethod
    def _headline_is_computed(cls, v: str, info: ValidationInfo) -> str:
        # aupro_thresholds is declared first, so it is validated by now (absent if invalid)
        counts = info.data.get("aupro_thresholds")
        if v != "exact" and counts is not None and int(v[3:]) not in counts:
            raise ValueError(f"needs {int(v[3:])} in evaluate.aupro_thresholds (got {counts})")
        return v

    def headline_thresholds(self) -> int | None:
        """The headline's threshold count, None for the exact AUPRO."""
        return None if self.headline_aupro == "exact" else int(self.headline_aupro[3:])


class ThresholdsParams(Section):
    """``thresholds``: decision thresholds from the scores of normal samples the model was
    not trained on (the dataset's validation split, or each shot under mappers trained
    without it; pipeline/thresholds.py). A sample or a pixel is anomalous when its score is
    above its threshold."""

    # validation: the validation split's normal samples; leave_one_out: each shot scored by
    # the mappers trained on the other k - 1 shots (for data without a validation split)
    normal_samples: Literal["validation", "leave_one_out"] = "validation"
    rule: Literal["quantile", "max_margin"] = "quantile"
    quantile: Float = Field(0.99, ge=0, le=1)  # image scores, rule quantile
    pixel_quantile: Float = Field(0.999, ge=0, le=1)  # foreground pixels, rule quantile
    margin: Float = Field(0.1, ge=0)  # rule max_margin: max * (1 + margin)
    image: Float | None = None  # a manual image threshold (overrides the rule)
    pixel: Float | None = None  # a manual pixel threshold (overrides the rule)


class Params(Section):
    data: DataParams
    demo_data: DemoDataParams = DemoDataParams()
    fewshot: FewshotParams = FewshotParams()
    models: ModelsParams = ModelsParams()
    augment: AugmentParams = AugmentParams()
    estimate_normals: EstimateNormalsParams = EstimateNormalsParams()
    extract_features: ExtractFeaturesParams = ExtractFeaturesParams()
    fit_mapper: FitMapperParams = FitMapperParams()
    infer: InferParams = InferParams()
    score: ScoreParams = ScoreParams()
    evaluate: EvaluateParams = EvaluateParams()
    thresholds: ThresholdsParams = ThresholdsParams()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        problems = [*self._duplicates(), *self._step_problems()]
        if problems:
            raise ValueError("\n".join(problems))
        known = {"mvtec3d": MVTEC3D_CATEGORIES,
                 "eyecandies": EYECANDIES_CATEGORIES}.get(self.data.dataset, ())
        root = Path(self.data.root)
        for category in self.data.categories:
            # A real dataset must use its official category names; a local dataset (the demo)
            # may name its own, as long as the folder exists. A missing root is reported by
            # the data layer when a stage reads it.
            # a demo category the demo_data stage will write is known before it exists
            if category in self.demo_data.categories:
                continue
            if category not in known and root.is_dir() and not (root / category).is_dir():
                allowed = f"allowed for {self.data.dataset}: {', '.join(known)}, or " if known \
                    else "expected "
                raise ValueError(f"data.categories: unknown category {category!r} ({allowed}"
                                 f"a folder under {root})")
        issues = official_setup_issues(self)  # released checkpoints need their setup
        if issues:
            raise ValueError("fit_mapper.mappers=official: the released checkpoints need the "
                             "published feature setup; inconsistent: " + "; ".join(issues))
        problems = [*route_problems(self), *checkpoint_problems(self),
                    *lora_checkpoint_problems(self), *self._online_noise_problems(),
                    *self._leave_one_out_problems(), *memory_problems(self)]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _online_noise_problems(self) -> list[str]:
        copies = self.extract_features.noisy_copies
        if self.fit_mapper.noise == "online" and copies:
            return [f"extract_features.noisy_copies: {copies} copies would be made and never "
                    "read: fit_mapper.noise=online draws fresh noise every step (set 0)"]
        return []

    def _leave_one_out_problems(self) -> list[str]:
        t = self.thresholds
        if t.normal_samples != "leave_one_out" or (t.image is not None and t.pixel is not None):
            return []
        way_out = ("thresholds.normal_samples: validation (a validation split), or both "
                   "thresholds.image and thresholds.pixel set by hand")
        problems = []
        if 1 in self.fewshot.shots:
            problems.append("thresholds.normal_samples: leave_one_out trains each model again "
                            "without one of its k shots, and fewshot.shots has k=1 (no shot "
                            f"left to train on); use k >= 2, or {way_out}")
        if self.fit_mapper.mappers == "official":
            problems.append("thresholds.normal_samples: leave_one_out trains mappers, but "
                            "fit_mapper.mappers is official (released weights, no training); "
                            f"use {way_out}")
        return problems

    def _duplicates(self) -> list[str]:
        problems = []
        for dotted in SET_KEYS:
            section, key = dotted.split(".")
            values = getattr(getattr(self, section, None), key, None)
            if values is None:
                continue
            seen: set = set()
            repeated = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
            if repeated:
                problems.append(
                    f"{dotted}: {', '.join(map(repr, dict.fromkeys(repeated)))} listed more than "
                    f"once (list each value once: {list(dict.fromkeys(values))})"
                )
        return problems

    def _step_problems(self) -> list[str]:
        steps = self.fit_mapper.steps
        problems = [
            f"fit_mapper.steps: k={k} must be >= 1 (got {k})" for k in steps if k < 1
        ] + [
            f"fit_mapper.steps: the step count for k={k} must be >= 1 (got {n}); "
            "an untrained mapper would be evaluated"
            for k, n in steps.items() if n < 1
        ]
        missing = [k for k in self.fewshot.shots if k not in steps]
        if missing:
            problems.append(
                f"fit_mapper.steps: no step count for k={', '.join(map(str, missing))} "
                f"(given for k in {sorted(steps)}; fewshot.shots is {self.fewshot.shots}: "
                "give one positive count for each)"
            )
        return problems


def format_validation_error(err: ValidationError, source: str,
                            root: type[BaseModel] | None = None) -> str:
    """One line per problem, ``source: dotted.key: message``; an unknown key lists the keys
    allowed where it stands (``root``: the model validated, default :class:`Params`)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and _is_model(_model_at(root or Params, e["loc"])):
            # a check across keys (of a section or of sections): its message names the keys
            lines.extend(f"{source}: {line}" for line in msg.splitlines())
            continue
        if e["type"] == "extra_forbidden":
            model = _model_at(root or Params, e["loc"][:-1])
            allowed = ", ".join(model.model_fields) if _is_model(model) else "?"
            msg = f"unknown key (allowed: {allowed})"
        elif "input" in e and e["type"] != "missing" and short(e["input"]) not in msg:
            msg = f"{msg} (got {short(e['input'])})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _model_at(root: type[BaseModel], loc: tuple) -> object:
    """The annotation that a validation error's location names, walked from ``root``."""
    model: object = root
    for part in loc:
        field = model.model_fields.get(str(part)) if _is_model(model) else None
        if field is None:
            return None
        model = field.annotation
    return model


def _is_model(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, source)) from None
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (plain YAML keeps the last one silently) and
    any anchor or alias: a parameter file needs none, and nested aliases expand exponentially
    (a few lines can stand for gigabytes of values)."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise yaml.composer.ComposerError(
                None, None, f"YAML {kind}{short(event.anchor, 30)[1:-1]} is not allowed in a "
                "parameter file (write the values out)", event.start_mark)
        return super().compose_node(parent, index)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[arg-type]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given more than once", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.2 (DVC's parser) reads 1e-3 as a number; PyYAML's YAML 1.1 wants 1.0e-3 and would
# hand the strict float fields a string.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own text adds a quote of the line below)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark = err.problem_mark
    what = "; ".join(filter(None, (err.context, err.problem)))
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, str(path))


def data_root_of(path: str | Path = "params.yaml") -> Path | None:
    """``data.root`` of a parameter file without validating the rest; None where it cannot be
    read (for the folders an --out must never replace)."""
    try:
        raw = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506
        return Path(raw["data"].get("root", DataParams.model_fields["root"].default))
    except Exception:  # no file, not YAML, no data section: nothing to protect
        return None


def section_dict(section: BaseModel) -> dict:
    """A section as plain JSON-able values, for provenance attributes."""
    return section.model_dump(mode="json")
