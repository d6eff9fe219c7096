"""The paper preset on a GPU: seconds per unit and peak memory of each stage's library code,
and what the full MVTec 3D-AD and Eyecandies tables cost.

    python benchmarks/paper_gpu.py --out DIR               # a GPU: published shapes, ~5 min
    python benchmarks/paper_gpu.py --smoke --out DIR       # the same code, tiny models, CPU
    python benchmarks/paper_gpu.py --budget-s 240 --parts estimate_normals,fit_mapper
    bash benchmarks/paper_gpu_device.sh                    # on the lent GPU machine (README)

The published architectures (``tests/fixtures/paper_models/``: SD 2.1-base, Marigold normals
v1-1, DINO ViT-B/8) are built with random weights directly on the device: no model folder is
written or read, so model loading (``from_pretrained``, seconds per stage instance) is not
measured. Each part then times the library functions the stage calls (``pipeline/``, not DVC,
not the stores) with the settings of ``presets/paper.yaml`` (``--preset``) on a measured slice:

- augment: ``train_lora`` (pivotal tuning: textual-inversion micro-steps, then LoRA steps at
  augment.resolution) and ``generate`` (img2img, fp16, n_per_shot images of one shot);
- estimate_normals: ``predict_normals`` (Marigold, steps x ensemble, fp32) of one
  original-resolution image (800 x 600, padded square) and one generated 512 image;
- extract_features: ``encode`` (DINO ViT-B/8, fp32) on batches of extract_features.batch_size;
- fit_mapper: ``train_stream`` (the two mappers of a stream per step, 224, batch 1) on features
  of the published shapes, real and estimated stream;
- infer + score: ``stream_maps``, ``finish_maps`` and ``evaluate_maps`` on a test set.

Each part reports seconds per unit (step, image, forward) after a warm-up, and its peak memory:
``torch.cuda.max_memory_allocated`` reset before each part (each phase of augment), or on a
CPU the peak resident set size reset the same way (``/proc/self/clear_refs``). Parts run in
one process, each with the torch settings it found at start restored afterwards (augment
runs with deterministic kernels, ``pipeline.determinism.deterministic``, as its stage does).

The figures are then extrapolated to the preset's full budgets: per (category, k), per
category, and for the whole MVTec 3D-AD and Eyecandies tables (10 categories x k = 1, 2, 4),
stage by stage, with the image counts of ``DATASETS``.

Speed-up options (``OPTIONS``) run after every default part, while ``--budget-s`` lasts, each
reported beside its default: Marigold's ensemble one member at a time (the published script;
the stage batches the whole ensemble), channels-last memory format, and TF32 matrix products
(``torch.backends.cuda.matmul.allow_tf32``). The defaults are the stages' own numerics.

``--smoke`` runs the same code with tiny configs of the same architectures on the CPU (tests,
``tests/test_paper_gpu.py``): its figures test the script, they say nothing about a GPU.
Outputs: the tables on stdout and, with ``--out``, ``paper_gpu.md`` and ``paper_gpu.json``,
rewritten after every part (a run cut short keeps what it measured). Exit status 1 if a
default part failed.

Adding a variant (``stages.fit_mapper.train_config`` builds what the stage and this script
train with): one more ``Part`` in ``PARTS`` with its params ``overrides`` and a ``label``; its
rows are reported beside the default's. The preset's ``fit_mapper.noise: online`` (fresh noise
through the backbone every step) is the default part; the stored noisy copies are a variant.
"""

from __future__ import annotations

import os

# cuBLAS reads this when its first handle is created; pipeline/training.py sets the same value
# at import, but whichever part runs first may create the handle before that import.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CMDS_AD_QUIET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.models.diffusion import ModelClock  # noqa: E402
from pipeline.params import Params, parse_params  # noqa: E402
from tools.scratch_project import deep_update  # noqa: E402

GIB = 2**30


# --------------------------------------------------------------------------------- datasets
MVTEC_SOURCE = ("Bergmann et al., The MVTec 3D-AD Dataset, VISAPP 2022, Table 1 "
                "(arXiv:2112.09045): train / test (good + defective) images per category")
EYECANDIES_SOURCE = ("Bonfiglioli et al., The Eyecandies Dataset, ACCV 2022, and its download "
                     "page: per category 1000 train, 100 val, 50 test_public (25 + 25; the "
                     "pipeline's test split)")
# (train images, test images) per category.
MVTEC_COUNTS = {
    "bagel": (244, 110), "cable_gland": (223, 108), "carrot": (286, 159), "cookie": (210, 131),
    "dowel": (288, 130), "foam": (236, 100), "peach": (361, 132), "potato": (300, 114),
    "rope": (298, 101), "tire": (210, 112),
}
EYECANDIES_CATEGORIES = ("CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto",
                         "GummyBear", "HazelnutTruffle", "LicoriceSandwich", "Lollipop",
                         "Marshmallow", "PeppermintCandy")
DATASETS = {
    "MVTec 3D-AD": ("paper.yaml", MVTEC_SOURCE, MVTEC_COUNTS),
    "Eyecandies": ("paper-eyecandies.yaml", EYECANDIES_SOURCE,
                   {c: (1000, 50) for c in EYECANDIES_CATEGORIES}),
}


# ------------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """The measured slice. Budgets and settings not named here are the preset's."""

    tiny: bool  # tiny configs of the published architectures (smoke)
    ti_steps: int  # textual-inversion micro-steps: warm-up + a multiple of the accumulation
    lora_steps: int
    warmup_steps: int  # steps of each phase left out of the per-step mean
    train_images: int  # images the LoRA trains on (each encoded once: cached latents)
    img2img_images: int  # images generated from one shot (the preset's n_per_shot)
    original_hw: tuple[int, int]  # a real image at its original resolution (padded square)
    feature_batches: int  # batches of extract_features.batch_size
    mapper_steps: int
    test_images: int
    half_on_cpu: bool  # run the fp16 parts in fp16 on a CPU too (smoke: exercise the fp16 path)
    params: tuple[tuple[str, Any], ...] = ()  # preset overrides (smoke: smaller shapes)


PAPER_SIZES = Sizes(
    tiny=False, ti_steps=2 + 16, lora_steps=2 + 12, warmup_steps=2, train_images=8,
    img2img_images=5, original_hw=(800, 600), feature_batches=4, mapper_steps=300,
    test_images=24, half_on_cpu=False,
)
SMOKE_SIZES = Sizes(
    tiny=True, ti_steps=2 + 4, lora_steps=2 + 2, warmup_steps=2, train_images=2,
    img2img_images=2, original_hw=(40, 30), feature_batches=2, mapper_steps=4, test_images=4,
    half_on_cpu=True,
    params=(("augment.resolution", 64), ("extract_features.batch_size", 2),
            ("fit_mapper.resolution", 56)),
)
# Tiny configs of the published architectures (smoke): the same classes and block layout.
TINY_CONFIG = {
    "UNet2DConditionModel": {"block_out_channels": [32, 32, 64, 64],
                             "attention_head_dim": [1, 1, 2, 2], "layers_per_block": 1,
                             "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 8},
    "AutoencoderKL": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
                      "norm_num_groups": 8, "sample_size": 64},
    "CLIPTextModel": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "projection_dim": 32, "vocab_size": 1000},
}
TINY_VOCAB = 1000
TINY_DINO = {"embed_dim": 48, "num_heads": 2}
TINY_PROCESSING_RESOLUTION = 64


# --------------------------------------------------------------------------- measurement
class Memory:
    """Peak memory of a stretch of work: the CUDA allocator's peak, or on a CPU the process's
    peak resident set (VmHWM), both reset when the stretch starts."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS
        except OSError:
            self.kind = "peak RSS since the process started"

    def peak(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(ModelClock):
    """The library's ModelClock, keeping each timed interval and its peak memory: train_lora
    times every step in one interval, so the phases can be told apart afterwards."""

    def __init__(self, device: torch.device, memory: Memory) -> None:
        super().__init__(device)
        self.memory = memory
        self.intervals: list[tuple[float, int | None]] = []

    @contextmanager
    def __call__(self) -> Iterator[None]:
        self._sync()
        self.memory.reset()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            self.seconds += seconds
            self.intervals.append((seconds, self.memory.peak()))


@dataclasses.dataclass
class Row:
    """One measured figure: ``seconds`` per ``unit`` over ``count`` units."""

    part: str
    what: str
    unit: str
    seconds: float | None
    count: int
    peak: int | None
    key: str = ""  # its name in the extrapolation's unit figures (default rows only)
    option: str = "default"
    error: str = ""


@dataclasses.dataclass
class Context:
    raw: dict  # the preset as read (with the smoke's model-size overrides)
    preset: str  # its name, for the report
    params: Params
    sizes: Sizes
    device: torch.device
    memory: Memory
    category: str
    rng: np.random.Generator

    def with_params(self, overrides: Mapping[str, Any]) -> Params:
        """The preset with dotted overrides, validated as a stage would see it."""
        raw = deep_update(json.loads(json.dumps(self.raw)), overrides)
        return parse_params(raw, "benchmark overrides")

    def measure(self, work: Callable[[], Any]) -> tuple[float, int | None, Any]:
        """Wall seconds (synchronised) and peak memory of one call."""
        gc.collect()
        sync(self.device)
        self.memory.reset()
        start = time.perf_counter()
        result = work()
        sync(self.device)
        return time.perf_counter() - start, self.memory.peak(), result

    def image(self, height: int, width: int) -> np.ndarray:
        return self.rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def mean_after(values: Sequence[float], warmup: int) -> float:
    kept = list(values[warmup:]) or list(values)
    return float(sum(kept) / len(kept))


def max_peak(peaks: Sequence[int | None]) -> int | None:
    known = [p for p in peaks if p is not None]
    return max(known) if known else None


# ------------------------------------------------------------------------------- models
def component_spec(spec: dict, tiny: bool) -> dict:
    """A fixture's component, or its tiny config (same class, fewer channels and layers)."""
    if not tiny:
        return spec
    return {**spec, "config": {**spec["config"], **TINY_CONFIG.get(spec["class"], {})}}


def build_on(device: torch.device, spec: dict, dtype: torch.dtype, tiny: bool) -> Any:
    """A component with random weights, allocated on the device (no folder, no CPU copy)."""
    from tools.paper_models import build_component

    with torch.device(device):
        module = build_component(component_spec(spec, tiny))
    return module.to(device=device, dtype=dtype)


def text_parts(ctx: Context, dtype: torch.dtype) -> tuple[Any, Any]:
    from tools.paper_models import build_tokenizer, load_fixture

    comps = load_fixture("sd21_base")["components"]
    spec = dict(comps["tokenizer"])
    if ctx.sizes.tiny:
        spec["vocab_size"] = TINY_VOCAB
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(spec, Path(tmp))
    encoder = build_on(ctx.device, comps["text_encoder"], dtype, ctx.sizes.tiny)
    return tokenizer, encoder


def build_sd(ctx: Context, dtype: torch.dtype) -> Any:
    """SD 2.1-base as the img2img pipeline augment loads (its parts also train the LoRA)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from tools.paper_models import build_scheduler, load_fixture

    comps = load_fixture("sd21_base")["components"]
    tokenizer, encoder = text_parts(ctx, dtype)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=build_on(ctx.device, comps["vae"], dtype, ctx.sizes.tiny), text_encoder=encoder,
        tokenizer=tokenizer, unet=build_on(ctx.device, comps["unet"], dtype, ctx.sizes.tiny),
        scheduler=build_scheduler(comps["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_marigold(ctx: Context, dtype: torch.dtype) -> Any:
    from diffusers import MarigoldNormalsPipeline

    from tools.paper_models import build_scheduler, load_fixture

    sd, fixture = load_fixture("sd21_base")["components"], load_fixture("marigold_normals_v1_1")
    index, comps = fixture["model_index"], fixture["components"]
    tokenizer, encoder = text_parts(ctx, dtype)
    resolution = (TINY_PROCESSING_RESOLUTION if ctx.sizes.tiny
                  else index["default_processing_resolution"])
    pipe = MarigoldNormalsPipeline(
        unet=build_on(ctx.device, comps["unet"], dtype, ctx.sizes.tiny),
        vae=build_on(ctx.device, sd["vae"], dtype, ctx.sizes.tiny),
        scheduler=build_scheduler(comps["scheduler"]), text_encoder=encoder, tokenizer=tokenizer,
        prediction_type=index["prediction_type"], use_full_z_range=index["use_full_z_range"],
        default_denoising_steps=index["default_denoising_steps"],
        default_processing_resolution=resolution,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_backbone(ctx: Context) -> Any:
    """DINO ViT-B/8 as extract_features runs it (pruned after the last layer used)."""
    import timm

    from pipeline.models.backbones import _finish, backbone_dtype
    from tools.paper_models import load_fixture

    fixture = load_fixture("dino_vitb8")
    f = ctx.params.extract_features
    with torch.device(ctx.device):
        model = timm.create_model(fixture["timm_name"], pretrained=False,
                                  num_classes=fixture["architecture"]["num_classes"],
                                  **(TINY_DINO if ctx.sizes.tiny else {}))
    backbone = _finish(model, f.layers, f"random:{fixture['timm_name']}", {"init": "random"})
    return backbone.to(device=ctx.device, dtype=backbone_dtype(f.precision, ctx.device))


def feature_shape(ctx: Context) -> tuple[int, int]:
    """(channels per layer, grid side) of the backbone's features at data.size."""
    from tools.paper_models import load_fixture

    arch = load_fixture("dino_vitb8")["architecture"]
    width = TINY_DINO["embed_dim"] if ctx.sizes.tiny else arch["embed_dim"]
    return width, ctx.params.data.size // arch["patch_size"]


def precision(ctx: Context, name: str) -> torch.dtype:
    """An augment precision as the stage uses it (float32 on a CPU, unless the smoke asks)."""
    if ctx.device.type == "cuda" or (ctx.sizes.half_on_cpu and name == "float16"):
        return getattr(torch, name)
    return torch.float32


# ------------------------------------------------------------------------------ the parts
def run_augment(ctx: Context, option: str | None) -> list[Row]:
    """Pivotal tuning (textual inversion, LoRA) and img2img, as ``stages.augment.run``."""
    from pipeline.augment.lora_files import lora_snapshot
    from pipeline.augment.lora_training import OBJECT_TEMPLATES, train_lora
    from pipeline.determinism import deterministic
    from stages.augment import _lora_config

    s, a = ctx.sizes, ctx.params.augment
    params = ctx.with_params({"augment.textual_inversion.steps": s.ti_steps,
                              "augment.steps": s.lora_steps})
    token = a.placeholder_token.format(category=ctx.category)
    prompts = ([a.prompt.format(category=ctx.category, token=token)] if a.train_prompts == "fixed"
               else [t.format(token) for t in OBJECT_TEMPLATES])
    with deterministic(ctx.device, warn_only=True):  # as the augment stage runs
        pipe = build_sd(ctx, precision(ctx, a.train_precision))
        images = [ctx.image(a.resolution, a.resolution) for _ in range(s.train_images)]
        clock = StepClock(ctx.device, ctx.memory)
        train_lora(pipe, images, prompts, _lora_config(params, token), clock)
        rows = lora_rows(ctx, params, clock)
        if option is None:
            lora_snapshot(pipe, a.train_text_encoder, token if a.learns_token() else None)
            rows.append(img2img_row(ctx, pipe, token))
    return rows


def lora_rows(ctx: Context, params: Params, clock: StepClock) -> list[Row]:
    """Split train_lora's intervals: cached latents, inversion micro-steps, LoRA steps."""
    a, w = params.augment, ctx.sizes.warmup_steps
    text_trains = a.train_text_encoder or a.textual_inversion.continue_lr > 0
    counts = [int(a.cache_latents), a.textual_inversion.steps, int(not text_trains), a.steps]
    if len(clock.intervals) != sum(counts):
        raise RuntimeError(f"train_lora timed {len(clock.intervals)} intervals, expected "
                           f"{sum(counts)} {counts}: its clock calls changed; update lora_rows")
    cache, rest = clock.intervals[: counts[0]], clock.intervals[counts[0]:]
    inversion, lora = rest[: counts[1]], rest[counts[1] + counts[2]:]
    res = f"{a.resolution} x {a.resolution}"
    rows = []
    if cache:
        rows.append(Row("augment", f"cache latents (VAE encode at {res})", "image",
                        cache[0][0] / ctx.sizes.train_images, ctx.sizes.train_images,
                        cache[0][1], "cache_latents"))
    for name, key, steps in (("textual inversion micro-step", "textual_inversion", inversion),
                             ("LoRA step (UNet + text encoder)", "lora", lora)):
        rows.append(Row("augment", f"{name} at {res}, train {a.train_precision}", "step",
                        mean_after([t for t, _ in steps], w), max(0, len(steps) - w),
                        max_peak([p for _, p in steps]), key))
    return rows


def img2img_row(ctx: Context, pipe: Any, token: str) -> Row:
    """The trained pipeline cast to augment.precision generating one shot's images."""
    from pipeline.augment.generation import generate, shot_seeds, use_euler_ancestral
    from pipeline.augment.images import to_square

    a, s = ctx.params.augment, ctx.sizes
    dtype = precision(ctx, a.precision)
    if pipe.dtype != dtype:
        pipe.to(dtype=dtype)
    use_euler_ancestral(pipe)
    seeds = shot_seeds(a.image_seeds, s.img2img_images, a.seed, 1, 0, 1)[0]
    shot = to_square(ctx.image(*s.original_hw))

    def once() -> Any:
        return generate(pipe, shot, a.prompt.format(category=ctx.category, token=token), seeds,
                        strength=a.strength, guidance=a.guidance,
                        inference_steps=a.inference_steps, resolution=a.resolution,
                        out_size=ctx.params.data.size, generator_device=a.generator_device)

    once()  # warm-up: the same shapes
    seconds, peak, (full, _) = ctx.measure(once)
    if full.shape != (len(seeds), a.resolution, a.resolution, 3):
        raise RuntimeError(f"img2img returned {full.shape}")
    steps = int(a.inference_steps * a.strength)
    return Row("augment", f"img2img {steps} of {a.inference_steps} steps at {a.resolution}, "
               f"{str(dtype).replace('torch.', '')}, batch {len(seeds)}", "image",
               seconds / len(seeds), len(seeds), peak, "img2img")


def run_marigold(ctx: Context, option: str | None) -> list[Row]:
    """Marigold on a real image at its original resolution and on a generated one."""
    from pipeline.augment.images import to_square
    from pipeline.device import inference_dtype
    from pipeline.normals_estimation import (
        PRECISION_DTYPES,
        MarigoldRun,
        image_seeds,
        predict_normals,
        resolve_resolution,
    )

    p, s, size = ctx.params.estimate_normals, ctx.sizes, ctx.params.data.size
    dtype = inference_dtype(ctx.device) if p.precision == "auto" else PRECISION_DTYPES[p.precision]
    pipe = build_marigold(ctx, dtype)
    if option == "channels-last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    resolution = resolve_resolution(pipe, p.processing_resolution, "paper")
    run = dataclasses.replace(MarigoldRun.of(p, resolution),
                              batch_size=1 if option == "sequential-ensemble" else 0)
    h, w = s.original_hw
    images = [("original", f"{h} x {w} padded to {max(h, w)}", to_square(ctx.image(h, w)))]
    if option is None:  # generated images are at augment.resolution
        g = ctx.params.augment.resolution
        images.append(("generated", f"{g} x {g}", ctx.image(g, g)))
    seeds = image_seeds(p.seed, ["sample"], p.seeding)
    predict_normals(pipe, images[0][2][None], seeds, dataclasses.replace(run, steps=1), size)
    rows = []
    for name, described, rgb in images:
        seconds, peak, out = ctx.measure(lambda: predict_normals(pipe, rgb[None], seeds, run, size))
        if out.shape != (1, size, size, 3):
            raise RuntimeError(f"Marigold returned {out.shape}")
        rows.append(Row("estimate_normals", f"Marigold {p.steps} steps x ensemble {p.ensemble}, "
                        f"{name} {described}, processing {resolution}, {p.precision}",
                        "image", seconds, 1, peak, f"marigold_{name}"))
    return rows


def run_features(ctx: Context, option: str | None) -> list[Row]:
    """The backbone's forward passes as extract_features makes them (clean and noisy input)."""
    from pipeline.determinism import deterministic
    from pipeline.features import encode

    f, s = ctx.params.extract_features, ctx.sizes
    with deterministic(ctx.device, warn_only=True):  # as stages.extract_features runs
        backbone = build_backbone(ctx)
        batch = f.batch_size
        size = ctx.params.data.size
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * f.noise_sigma
        encode(backbone, x, "rgb")  # warm-up

        def batches() -> None:
            for i in range(s.feature_batches):  # half clean, half with a noisy copy's noise
                encode(backbone, x, "rgb", noise if i % 2 else None)

        seconds, peak, _ = ctx.measure(batches)
    n = batch * s.feature_batches
    return [Row("extract_features", f"DINO ViT-B/8 forward, {f.precision}, batch {batch}, "
                f"{size} x {size}, blocks {f.layers}", "image", seconds / n, n, peak, "dino")]


def stream_data(ctx: Context, n: int, masked: bool, backbone: Any = None) -> Any:
    """Training pairs of one stream at the stored features' shapes and dtype (noisy copies),
    or, with ``backbone`` (``fit_mapper.noise: online``), the clean features and images that
    each step encodes with fresh noise."""
    from pipeline.features import encode_tensors
    from pipeline.training import OnlineNoise, StreamData

    channels, grid = feature_shape(ctx)
    f = ctx.params.extract_features
    copies = f.noisy_copies
    res = ctx.params.fit_mapper.resolution

    def layers(c: int) -> list[np.ndarray]:
        return [ctx.rng.standard_normal((n, c, channels, grid, grid), np.float32)
                .astype(f.feature_dtype) for _ in range(3)]

    masks = (ctx.rng.random((n, res, res)) > 0.3).astype(np.float32) if masked else None
    if backbone is None:
        return StreamData(layers(max(copies, 1)), layers(max(copies, 1)), masks, layers(1),
                          layers(1))
    size = ctx.params.data.size
    images = [torch.from_numpy(ctx.rng.random((n, 3, size, size), np.float32)) for _ in "ab"]
    online = OnlineNoise(*images, lambda x, kind, added: encode_tensors(backbone, x, kind, added),
                         f.noise_sigma, f.noise_space)
    return StreamData(layers(1), layers(1), masks, online=online)


def run_mappers(ctx: Context, option: str | None) -> list[Row]:
    """train_stream on the real stream (k shots, masked) and the estimated one (k + 5k)."""
    from pipeline.training import train_stream
    from stages.fit_mapper import train_config

    k = 1
    online = ctx.params.fit_mapper.noise == "online"
    backbone = build_backbone(ctx) if online else None
    streams = [("real", stream_data(ctx, k, True, backbone)),
               ("est", stream_data(ctx, k + k * ctx.params.augment.n_per_shot, False, backbone))]
    if option is not None:
        streams = streams[1:]
    config = train_config(ctx.params.fit_mapper, ctx.sizes.mapper_steps)
    rows = []
    with channels_last_mappers(option == "channels-last"):
        train_stream(streams[0][1], dataclasses.replace(config, steps=2), 0, ctx.device, "warm-up")
        for name, data in streams:
            seconds, peak, _ = ctx.measure(lambda: train_stream(data, config, 0, ctx.device, name))
            rows.append(Row("fit_mapper", f"{name} stream: two {config.architecture} mappers at "
                            f"{config.resolution}, batch {config.batch_size}, noise_on "
                            f"{config.noise_on}, noise {ctx.params.fit_mapper.noise}", "step",
                            seconds / config.steps, config.steps,
                            peak, f"mapper_{name}"))
    return rows


@contextmanager
def channels_last_mappers(on: bool) -> Iterator[None]:
    """train_stream builds its mappers itself: convert them as they are built."""
    from pipeline import training

    if not on:
        yield
        return
    original = training.build_mapper
    training.build_mapper = lambda *a: original(*a).to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        training.build_mapper = original


def run_test_set(ctx: Context, option: str | None) -> list[Row]:
    """infer (the four mappers on the test set), score (fusion, smoothing) and the metrics."""
    from pipeline.inference import MAPPER_NAMES, stream_maps
    from pipeline.models.mapper import build_mapper

    p, n, size = ctx.params, ctx.sizes.test_images, ctx.params.data.size
    channels, grid = feature_shape(ctx)
    res = p.fit_mapper.resolution
    mappers = {m: build_mapper(p.fit_mapper.architecture, [channels] * 3, [channels] * 3)
               .to(ctx.device).eval() for m in MAPPER_NAMES}
    stored = {m: [ctx.rng.standard_normal((n, channels, grid, grid), np.float32).astype(np.float16)
                  for _ in range(3)] for m in ("rgb", "real", "est")}

    def infer(start: int, stop: int) -> dict[str, np.ndarray]:
        feats = {m: [torch.from_numpy(np.asarray(a[start:stop], np.float32)).to(ctx.device)
                     for a in layers] for m, layers in stored.items()}
        with torch.inference_mode():
            maps = stream_maps(mappers, feats, res, size, p.infer.distance)
        return {k: v.float().cpu().numpy().astype(np.float16) for k, v in maps.items()}

    batch = p.infer.batch_size
    infer(0, min(n, batch))  # warm-up
    seconds, peak, parts = ctx.measure(
        lambda: [infer(i, min(n, i + batch)) for i in range(0, n, batch)])
    streams = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    rows = [Row("infer", f"four {p.fit_mapper.architecture} mappers + {p.infer.distance} distance, "
                f"batch {batch}, maps {size} x {size}", "image", seconds / n, n, peak, "infer")]
    return rows + score_rows(ctx, streams)


def score_rows(ctx: Context, streams: dict[str, np.ndarray]) -> list[Row]:
    """score's fusion and smoothing (numpy) and evaluate's metrics, on the CPU as they run."""
    from pipeline.metrics import evaluate_maps
    from pipeline.scoring import finish_maps

    p, n, size = ctx.params, ctx.sizes.test_images, ctx.params.data.size
    fg = np.ones((n, size, size), np.uint8)
    batch = p.score.batch_size
    seconds, peak, parts = ctx.measure(lambda: [
        finish_maps({k: v[i : i + batch] for k, v in streams.items()}, fg[i : i + batch],
                    ctx.category, p.score) for i in range(0, n, batch)])
    maps = np.concatenate([s.map_pro for s in parts])
    scores = np.concatenate([s.image_score for s in parts])
    labels = np.arange(n) % 2
    gt = np.zeros((n, size, size), np.uint8)
    gt[labels == 1, size // 3 : size // 2, size // 3 : size // 2] = 1
    metric_s, metric_peak, _ = ctx.measure(lambda: evaluate_maps(
        maps, gt, labels, scores, limits=p.evaluate.limits,
        aupro_thresholds=p.evaluate.aupro_thresholds))
    return [Row("score", f"fusion {p.score.fusion}, {p.score.smoothing} smoothing (CPU)", "image",
                seconds / n, n, peak, "score"),
            Row("evaluate", "I-AUROC, P-AUROC, AUPRO exact + thr99 (CPU)", "image",
                metric_s / n, n, metric_peak, "metrics")]


# --------------------------------------------------------------------- parts and options
@dataclasses.dataclass(frozen=True)
class Part:
    """One stage's measurement. An entry with ``overrides`` and a ``label`` other than
    "default" is a variant: its rows are reported beside the default's, like an option's."""

    name: str
    run: Callable[[Context, str | None], list[Row]]
    options: tuple[str, ...] = ()  # speed-up options tried beside the default
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # params of this entry
    label: str = "default"


PARTS: tuple[Part, ...] = (
    Part("augment", run_augment, ("tf32",)),
    Part("estimate_normals", run_marigold, ("sequential-ensemble", "channels-last", "tf32")),
    Part("extract_features", run_features, ("tf32",)),
    # The mappers are convolutions only, which cuDNN runs in TF32 already by default
    # (torch.backends.cudnn.allow_tf32): the tf32 option would change nothing there.
    Part("fit_mapper", run_mappers, ("channels-last",)),
    # the cached alternative to the preset's fresh noise through the backbone every step
    Part("fit_mapper", run_mappers, overrides={"fit_mapper.noise": "copies",
                                               "extract_features.noisy_copies": 8},
         label="stored noisy copies"),
    Part("infer+score", run_test_set),
)
# Options run after all defaults, the likely largest stages first, while the budget lasts.
OPTION_ORDER = ("estimate_normals", "fit_mapper", "extract_features", "augment")
OPTIONS = {
    "sequential-ensemble": "Marigold's ensemble members one per UNet call (the published script)",
    "channels-last": "models in channels-last memory format",
    "tf32": "TF32 matrix products (torch.backends.cuda.matmul.allow_tf32; cuDNN convolutions "
            "use TF32 by default already)",
}


@contextmanager
def torch_settings(tf32: bool = False) -> Iterator[None]:
    """Run with TF32 matmuls if asked; restore every global torch setting a part may change."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    if tf32:
        torch.set_float32_matmul_precision("high")  # = backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
        torch.backends.cudnn.allow_tf32 = saved[4]
        torch.set_float32_matmul_precision(saved[5])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_part(ctx: Context, part: Part, option: str | None) -> tuple[list[Row], float]:
    """One part (or one option of it); an error becomes a row, not the end of the run."""
    start = time.perf_counter()
    label = option or part.label
    try:
        sub = (dataclasses.replace(ctx, params=ctx.with_params(part.overrides))
               if part.overrides else ctx)
        with torch_settings(tf32=option == "tf32"):
            rows = part.run(sub, option)
        for row in rows:
            row.option = label
            if label != "default":  # the extrapolation uses the defaults' figures
                row.key = ""
    except Exception as err:  # noqa: BLE001 - the report names it; the next part still runs
        traceback.print_exc()
        rows = [Row(part.name, "FAILED", "", None, 0, None, option=label,
                    error=f"{type(err).__name__}: {err}".splitlines()[0][:300])]
    return rows, time.perf_counter() - start


# ------------------------------------------------------------------------- extrapolation
def shot_union(params: Params) -> int:
    """Train images per category that get normals and features (the union of the shots)."""
    if params.fewshot.strategy == "first":
        return max(params.fewshot.shots)
    return sum(params.fewshot.shots) * len(params.fewshot.seeds)


def instance_seconds(u: Mapping[str, float], params: Params, n_train: int, n_test: int,
                     k: int) -> dict[str, float]:
    """Seconds of each (category, k, seed) stage instance at the preset's full budgets."""
    a, f = params.augment, params.extract_features
    generated = k * a.n_per_shot
    trained_on = n_train if a.train_on == "train_split" else k
    encodes = trained_on if a.cache_latents else a.textual_inversion.steps + a.steps
    return {
        "augment": (encodes * u["cache_latents"] + a.steps * u["lora"]
                    + a.textual_inversion.steps * u["textual_inversion"]
                    + generated * u["img2img"]),
        "estimate_normals (generated)": generated * u["marigold_generated"],
        "extract_features (generated)": generated * 2 * (1 + f.noisy_copies) * u["dino"],
        "fit_mapper": params.fit_mapper.steps_for(k) * (u["mapper_real"] + u["mapper_est"]),
        "infer": n_test * u["infer"],
        "score + evaluate": n_test * (u["score"] + u["metrics"]),
    }


def category_seconds(u: Mapping[str, float], params: Params, n_test: int) -> dict[str, float]:
    """Seconds of the per-category stages (real images, shared by every k)."""
    shots, copies = shot_union(params), params.extract_features.noisy_copies
    return {
        "estimate_normals (real)": (shots + n_test) * u["marigold_original"],
        "extract_features (real)": (shots * 3 * (1 + copies) + n_test * 3) * u["dino"],
    }


def dataset_seconds(u: Mapping[str, float], params: Params,
                    counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Every stage summed over the preset's categories, k and seeds."""
    total: dict[str, float] = {}
    for category in params.data.categories:
        n_train, n_test = counts[category]
        parts = [category_seconds(u, params, n_test)]
        parts += [instance_seconds(u, params, n_train, n_test, k)
                  for k in params.fewshot.shots for _ in params.fewshot.seeds]
        for part in parts:
            for stage, seconds in part.items():
                total[stage] = total.get(stage, 0.0) + seconds
    return total


def extrapolate(units: Mapping[str, float]) -> dict[str, Any]:
    """Per (category, k) for the first MVTec category, and the two full tables."""
    needed = ("cache_latents", "textual_inversion", "lora", "img2img", "marigold_original",
              "marigold_generated", "dino", "mapper_real", "mapper_est", "infer", "score",
              "metrics")
    missing = [k for k in needed if units.get(k) is None]
    if missing:
        return {"missing": missing}
    out: dict[str, Any] = {"tables": {}}
    for dataset, (preset, source, counts) in DATASETS.items():
        params = load_preset(REPO / "presets" / preset)
        categories = {c: {"per_category": category_seconds(units, params, counts[c][1]),
                          "per_k": {k: instance_seconds(units, params, *counts[c], k)
                                    for k in params.fewshot.shots}}
                      for c in params.data.categories}
        out["tables"][dataset] = {"source": source, "preset": preset, "categories": categories,
                                  "stages": dataset_seconds(units, params, counts)}
        if "example" not in out:
            category = params.data.categories[0]
            n_train, n_test = counts[category]
            out["example"] = {
                "category": category, "n_train": n_train, "n_test": n_test,
                "per_k": {k: instance_seconds(units, params, n_train, n_test, k)
                          for k in params.fewshot.shots},
                "per_category": category_seconds(units, params, n_test)}
    return out


# ----------------------------------------------------------------------------- reporting
def hms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def per_unit(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def gib(peak: int | None) -> str:
    return "n/a" if peak is None else f"{peak / GIB:.2f} GiB"


def measured_table(rows: Sequence[Row]) -> list[str]:
    lines = ["| part | what | per | seconds per unit | units timed | peak memory | option |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        what = r.what if not r.error else f"FAILED: {r.error}"
        lines.append(f"| {r.part} | {what} | {r.unit} | {per_unit(r.seconds)} | {r.count} | "
                     f"{gib(r.peak)} | {r.option} |")
    return lines


def option_table(rows: Sequence[Row]) -> list[str]:
    """Each option beside the default figure of the same part and unit."""
    defaults = {(r.part, r.what): r for r in rows if r.option == "default"}
    lines = ["| part | what | default | option | with option | speed-up |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.option == "default" or r.error:
            continue
        base = defaults.get((r.part, r.what))
        ratio = f"{base.seconds / r.seconds:.2f}x" if base and base.seconds and r.seconds else "n/a"
        lines.append(f"| {r.part} | {r.what} | {per_unit(base.seconds if base else None)} | "
                     f"{r.option} | {per_unit(r.seconds)} | {ratio} |")
    return lines if len(lines) > 2 else []


def extrapolation_table(extra: Mapping[str, Any]) -> list[str]:
    if "missing" in extra:
        return [f"No extrapolation: no figure for {', '.join(extra['missing'])}."]
    ex, tables = extra["example"], extra["tables"]
    ks = sorted(ex["per_k"])
    head = (["stage"] + [f"{ex['category']} k={k}" for k in ks] + [f"{ex['category']} per category"]
            + [f"{name} (all)" for name in tables])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stages = list(ex["per_category"]) + list(ex["per_k"][ks[0]])
    for stage in stages:
        cells = [hms(ex["per_k"][k].get(stage)) if stage in ex["per_k"][k] else "" for k in ks]
        cells.append(hms(ex["per_category"][stage]) if stage in ex["per_category"] else "")
        cells += [hms(t["stages"].get(stage)) for t in tables.values()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [hms(sum(ex["per_k"][k].values())) for k in ks]
    totals.append(hms(sum(ex["per_category"].values())))
    totals += [hms(sum(t["stages"].values())) for t in tables.values()]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    lines += ["", f"Images ({ex['category']}: {ex['n_train']} train, {ex['n_test']} test):"]
    lines += [f"- {name}: {t['source']} (presets/{t['preset']})" for name, t in tables.items()]
    return lines + ["", "How: " + FORMULAS]


FORMULAS = (
    "augment = train images (train_split; each encoded once) x cache latents + "
    "textual_inversion.steps x micro-step + steps x LoRA step + 5k x img2img image; "
    "estimate_normals (real) = (union of the shots + test images) x Marigold original; "
    "(generated) = 5k x Marigold generated; extract_features (real) = (shots x 3 modalities x "
    "(1 + noisy_copies) + test x 3) x forward; (generated) = 5k x 2 x (1 + noisy_copies) x "
    "forward; fit_mapper = steps(k) x (real step + est step); infer, score + evaluate = test "
    "images x their figures. Summed over the categories and k = 1, 2, 4 for the tables. Not in "
    "them: prepare (CPU), model loading per stage instance, store I/O, DVC.")


def environment(device: torch.device, smoke: bool, preset: str) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "preset": preset, "smoke": smoke, "threads": torch.get_num_threads(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env["gpu_memory_gib"] = round(total / GIB, 1)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def report(env: Mapping[str, Any], rows: Sequence[Row], extra: Mapping[str, Any],
           memory_kind: str, elapsed: float) -> str:
    lines = [f"# {env['preset']} on {env['device']}" + (" (SMOKE: tiny models, figures test "
                                                        "the script only)" if env["smoke"] else ""),
             "", " ".join(f"{k}={v}" for k, v in env.items()), "",
             f"Measured (peak memory: {memory_kind}; {elapsed:.0f} s in all):", ""]
    lines += measured_table(rows)
    options = option_table(rows)
    if options:
        lines += ["", "Options beside the default (same run):", ""] + options + [""]
        lines += [f"- {name}: {what}" for name, what in OPTIONS.items()]
    lines += ["", "Extrapolated to the preset's full budgets (model loading and DVC not "
              "included):", ""] + extrapolation_table(extra)
    return "\n".join(lines) + "\n"


def write_outputs(out: Path | None, text: str, payload: Mapping[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("paper_gpu.md", text),
                          ("paper_gpu.json", json.dumps(payload, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, out / name)


# ---------------------------------------------------------------------------------- main
def load_preset(path: Path) -> Params:
    return parse_params(yaml.safe_load(path.read_text()), str(path))


def make_context(preset: Path, sizes: Sizes, device: torch.device) -> Context:
    raw = deep_update(yaml.safe_load(preset.read_text()), dict(sizes.params))
    params = parse_params(raw, str(preset))
    name = str(preset.relative_to(REPO)) if preset.is_relative_to(REPO) else str(preset)
    return Context(raw, name, params, sizes, device, Memory(device), params.data.categories[0],
                   np.random.default_rng(0))


def plan(parts: Sequence[Part], with_options: bool) -> list[tuple[Part, str | None]]:
    """Every default part, then the options in OPTION_ORDER."""
    runs: list[tuple[Part, str | None]] = [(part, None) for part in parts]
    if with_options:
        by_name: dict[str, Part] = {}
        for part in parts:  # a variant (overrides) shares the default's name: options on the default
            by_name.setdefault(part.name, part)
        for name in OPTION_ORDER:
            if name in by_name:
                runs += [(by_name[name], option) for option in by_name[name].options]
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (tests)")
    parser.add_argument("--preset", type=Path, default=REPO / "presets" / "paper.yaml")
    parser.add_argument("--out", type=Path, default=None, help="write paper_gpu.{md,json} here")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting parts or options after this many seconds")
    parser.add_argument("--parts", default="", help="comma-separated part names (default: all)")
    parser.add_argument("--no-options", action="store_true", help="defaults only")
    args = parser.parse_args(argv)

    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the published shapes need a GPU (use --smoke on a CPU)")
    wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(wanted) - {p.name for p in PARTS})
    if unknown:
        parser.error(f"--parts: unknown {unknown} (parts: {', '.join(p.name for p in PARTS)})")
    parts = [p for p in PARTS if not wanted or p.name in wanted]
    sizes = SMOKE_SIZES if args.smoke else PAPER_SIZES
    if args.smoke:
        # Tiny layers on a shared CPU: a 2-thread pool spin-waits and times vary ten-fold
        # (pipeline.models.diffusion.demo_threads); one thread gives steady figures.
        torch.set_num_threads(1)
    ctx = make_context(args.preset, sizes, device)
    return run_all(ctx, plan(parts, not args.no_options), args.budget_s, args.out)


def run_all(ctx: Context, runs: Sequence[tuple[Part, str | None]], budget_s: float,
            out: Path | None) -> int:
    start = time.perf_counter()
    env = environment(ctx.device, ctx.sizes.tiny, ctx.preset)
    rows: list[Row] = []
    wall: dict[str, float] = {}
    text = report(env, rows, extrapolate({}), ctx.memory.kind, 0.0)
    for part, option in runs:
        used = time.perf_counter() - start
        # an option starts only if about as long as its default run still fits
        if option is not None and used + wall.get(part.name, 0.0) > budget_s:
            rows.append(Row(part.name, f"skipped: budget ({budget_s:.0f} s)", "", None, 0, None,
                            option=option))
            continue
        if option is None and used > budget_s:
            rows.append(Row(part.name, "FAILED", "", None, 0, None,
                            error=f"not run: budget {budget_s:.0f} s spent"))
            continue
        print(f"[{used:6.1f} s] {part.name} ({option or 'default'})", flush=True)
        new, seconds = run_part(ctx, part, option)
        wall.setdefault(part.name, seconds)
        rows += new
        units = {r.key: r.seconds for r in rows if r.key and r.seconds is not None}
        extra = extrapolate(units)
        payload = {"environment": env, "sizes": dataclasses.asdict(ctx.sizes),
                   "rows": [dataclasses.asdict(r) for r in rows], "units": units,
                   "extrapolation": extra, "memory": ctx.memory.kind,
                   "elapsed_s": time.perf_counter() - start}
        text = report(env, rows, extra, ctx.memory.kind, time.perf_counter() - start)
        write_outputs(out, text, payload)
    print(text, end="")
    failed = [r for r in rows if r.error and r.option == "default"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
