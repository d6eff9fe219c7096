"""The one config source: ``params.yaml``, one section per stage, validated at stage start.

Every model forbids unknown keys, so a typo fails with a message naming the key. Errors are
raised as :class:`ParamsError` with the dotted key path, e.g. ``score.fusion``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ParamsError

MVTEC3D_CATEGORIES = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel",
    "foam", "peach", "potato", "rope", "tire",
)
EYECANDIES_CATEGORIES = (
    "CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear",
    "HazelnutTruffle", "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy",
)


class Section(BaseModel):
    # NaN and infinity pass ``ge``/``gt`` bounds in odd ways; no parameter needs them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Lists that are sets: a repeated entry would run the same work twice and count it twice
# (double rows in the summary and its mean). Checked across sections by Params.
SET_KEYS = (
    "data.categories",
    "fewshot.shots",
    "fewshot.seeds",
    "evaluate.limits",
    "augment.lora_targets",
    "score.large_box_categories",
)


class DataParams(Section):
    """``data``: which dataset and the preprocessing (DESIGN 1.1)."""

    dataset: Literal["mvtec3d", "eyecandies"] = "mvtec3d"
    root: str = "data/demo"
    categories: list[str] = Field(min_length=1)
    size: int = Field(224, ge=16)
    plane_border: int = Field(10, ge=1)
    plane_distance: float = Field(0.005, gt=0)
    ransac_iterations: int = Field(200, ge=1)
    cluster_eps: float = Field(0.006, gt=0)
    cluster_min_points: int = Field(30, ge=1)
    seed: int = 0


class FewshotParams(Section):
    """``fewshot``: the shots k, seeds and how shots are chosen."""

    shots: list[int] = Field(default=[1, 2, 4], min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
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


class AugmentParams(Section):
    """``augment``: LoRA fine-tuning and img2img generation (DESIGN 1.3)."""

    train_on: Literal["shots", "train_split"] = "shots"
    n_per_shot: int = Field(5, ge=0)
    lora_rank: int = Field(8, ge=1)
    lora_targets: list[str] = Field(default=["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    train_text_encoder: bool = False
    lr: float = Field(1e-4, gt=0)
    steps: int = Field(1000, ge=1)
    resolution: int = Field(512, ge=8)
    color_jitter: float = Field(0.05, ge=0, le=1)
    placeholder_token: str = "sks"
    prompt: str = "a photo of sks {category}"
    strength: float = Field(0.2, gt=0, le=1)
    guidance: float = Field(4.0, ge=0)
    inference_steps: int = Field(50, ge=1)
    seed: int = 0


class EstimateNormalsParams(Section):
    """``estimate_normals``: Marigold normals from RGB (DESIGN 1.2)."""

    steps: int = Field(10, ge=1)
    ensemble: int = Field(10, ge=1)
    processing_resolution: int = Field(0, ge=0)  # 0 = the input resolution
    batch_size: int = Field(1, ge=1)
    seed: int = 0


class ExtractFeaturesParams(Section):
    """``extract_features``: the frozen backbone and its three layers (DESIGN 1.4)."""

    layers: list[int] = Field(default=[4, 7, 11], min_length=3, max_length=3)
    batch_size: int = Field(8, ge=1)
    noisy_copies: int = Field(0, ge=0)
    noise_sigma: float = Field(0.01, ge=0)
    seed: int = 0


class FitMapperParams(Section):
    """``fit_mapper``: the four cross-modal mappers per category and k (DESIGN 1.5)."""

    architecture: Literal["cahfm", "mlp"] = "cahfm"
    resolution: int = Field(224, ge=1)
    steps: dict[int, int] = Field(default={1: 3000, 2: 1500, 4: 750})
    lr: float = Field(1e-4, gt=0)
    lr_min: float = Field(1e-6, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    layer_weights: list[float] = Field(default=[1.2, 1.0, 0.8], min_length=3, max_length=3)
    batch_size: int = Field(1, ge=1)
    seed: int = 0

    def steps_for(self, k: int) -> int:
        if k not in self.steps:
            raise ParamsError(
                f"fit_mapper.steps: no step count for k={k} (given for k in {sorted(self.steps)})"
            )
        return self.steps[k]


class InferParams(Section):
    """``infer``: mapper inference on the test set, the four raw stream maps (DESIGN 1.6)."""

    batch_size: int = Field(8, ge=1)
    # layerwise: 1 - cos over the concatenation of per-layer unit-normalised features (the mean
    # of the per-layer cosine distances the mappers are trained on); concatenated: 1 - cos over
    # the raw concatenation, whose result the untrained predicted layer norms dominate.
    distance: Literal["layerwise", "concatenated"] = "layerwise"


class ScoreParams(Section):
    """``score``: stream fusion, smoothing and normalisation (DESIGN 1.6)."""

    lambda_1: float = Field(0.1, ge=0)
    lambda_2: float = Field(0.1, ge=0)
    fusion: Literal["product", "sum", "max"] = "product"
    modalities: Literal["both", "2d", "3d"] = "both"
    streams: Literal["both", "real", "estimated"] = "both"
    smoothing: Literal["box", "gaussian"] = "box"
    box_sizes: tuple[int, int] = (3, 5)
    box_sizes_large: tuple[int, int] = (5, 7)
    large_box_categories: list[str] = Field(
        default=["carrot", "cookie", "peach", "potato", "rope", "HazelnutTruffle"]
    )
    gaussian_sigma: float = Field(4.0, gt=0)
    batch_size: int = Field(8, ge=1)

    def box_for(self, category: str) -> tuple[int, int]:
        return self.box_sizes_large if category in self.large_box_categories else self.box_sizes


class EvaluateParams(Section):
    """``evaluate``: metrics, tables and pictures (DESIGN 1.7)."""

    limits: list[float] = Field(default=[0.3, 0.1, 0.05, 0.01], min_length=1)
    aupro_thresholds: int | None = Field(None, ge=2)
    heatmaps_per_class: int = Field(3, ge=0)

    @field_validator("limits")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if any(not 0 < x <= 1 for x in v):
            raise ValueError("every limit must be in (0, 1]")
        return v


class Params(Section):
    data: DataParams
    fewshot: FewshotParams = FewshotParams()
    models: ModelsParams = ModelsParams()
    augment: AugmentParams = AugmentParams()
    estimate_normals: EstimateNormalsParams = EstimateNormalsParams()
    extract_features: ExtractFeaturesParams = ExtractFeaturesParams()
    fit_mapper: FitMapperParams = FitMapperParams()
    infer: InferParams = InferParams()
    score: ScoreParams = ScoreParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        problems = [*self._duplicates(), *self._step_problems()]
        if problems:
            raise ValueError("\n".join(problems))
        known = MVTEC3D_CATEGORIES if self.data.dataset == "mvtec3d" else EYECANDIES_CATEGORIES
        root = Path(self.data.root)
        for category in self.data.categories:
            # A real dataset must use its official category names; a local dataset (the demo)
            # may name its own, as long as the folder exists. A missing root is reported by
            # the data layer when a stage reads it.
            if category not in known and root.is_dir() and not (root / category).is_dir():
                raise ValueError(
                    f"data.categories: unknown category {category!r} "
                    f"(allowed for {self.data.dataset}: {', '.join(known)}, "
                    f"or a folder under {root})"
                )
        return self

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


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if not key:  # a cross-section check: its message already names the keys
            lines.extend(f"{source}: {line}"
                         for line in msg.removeprefix("Value error, ").splitlines())
            continue
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            model: type[BaseModel] = Params
            for part in parent:
                field = model.model_fields.get(str(part))
                model = field.annotation if field is not None else model  # type: ignore[assignment]
            allowed = ", ".join(model.model_fields) if isinstance(model, type) else "?"
            msg = f"unknown key (allowed: {allowed})"
        elif "input" in e and e["type"] != "missing":
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_validation_error(err, source)) from None
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (plain YAML keeps the last one silently)."""


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


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, str(path))


def section_dict(section: BaseModel) -> dict:
    """A section as plain JSON-able values, for provenance attributes."""
    return section.model_dump(mode="json")
