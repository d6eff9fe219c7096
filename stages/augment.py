"""Stage ``augment``: LoRA fine-tuning on the shots and img2img generation (DESIGN 1.3).

Reads  ``artifacts/prepare/<cat>/train.zarr`` (``rgb``, attrs ``ids``) and ``shots.json``;
       with ``augment.train_on: train_split`` also the raw training images of the dataset
       (the published behaviour, which trains the LoRA on normal data beyond the k shots).
       with ``augment.image_source: original`` the shots' original RGB from the dataset
       (padded to a square, as prepare pads).
Writes ``artifacts/augment/<cat>/k<k>-s<seed>/`` (one atomic directory):
       ``lora.safetensors`` (diffusers LoRA format + base model id in its metadata),
       ``token.safetensors`` when a placeholder token was learned (textual inversion), and
       ``generated.zarr`` (``rgb`` (M, S, S, 3) uint8 at data.size and ``rgb_full``
       (M, R, R, 3) uint8 at R = augment.resolution; attrs ``ids`` = ``gen/<shot id>/<j>``,
       ``source_ids``, ``seeds``, ``base_model``, ``token``, provenance).
``augment.lora: official`` trains nothing: the released lora_pti file
``<augment.lora_checkpoints>/<cat>/final_lora.safetensors`` is converted
(``pipeline/augment/lora_pti.py``), loaded, and written as ``lora.safetensors`` /
``token.safetensors``; generation is the same.
``augment.n_per_shot: 0`` disables augmentation: no model is loaded, ``generated.zarr`` is
empty (M = 0) and ``lora.safetensors`` is an empty marker (no tensors, metadata
``cmds_ad.status = empty``), so DVC's declared outputs exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import StoreWriter, atomic_dir, open_store, provenance
from pipeline.augment.generation import generate, shot_seeds, use_euler_ancestral
from pipeline.augment.images import resize_rgb, to_square
from pipeline.augment.lora_files import (
    LoraSnapshot,
    load_lora,
    lora_snapshot,
    save_empty_lora,
    write_lora,
)
from pipeline.augment.lora_pti import released_path, released_snapshot
from pipeline.augment.lora_training import (
    OBJECT_TEMPLATES,
    LoraTraining,
    TextualInversion,
    lora_summary,
    train_lora,
)
from pipeline.background import BackgroundWriter
from pipeline.determinism import deterministic
from pipeline.device import pick_device
from pipeline.errors import InputError, ParamsError
from pipeline.models.diffusion import ModelClock, demo_threads, load_img2img, model_info
from pipeline.params import AugmentParams, Params, section_dict
from pipeline.progress import info, track
from stages import layout

LORA_FILE = "lora.safetensors"


def read_shot_images(category: str, ids: list[str], size: int) -> np.ndarray:
    store = open_store(layout.prepared(category) / "train.zarr")
    stored = store.ids
    rgb = store["rgb"]
    if rgb.dtype.name != "uint8" or tuple(rgb.shape[1:]) != (size, size, 3):
        raise InputError(
            f"{store.path}: 'rgb' must be (N, {size}, {size}, 3) uint8 (data.size={size}), "
            f"got {tuple(rgb.shape)} {rgb.dtype}"
        )
    missing = [i for i in ids if i not in stored]
    if missing:
        raise InputError(f"{store.path}: shot ids {missing} from shots.json are not in the store")
    return np.stack([rgb[stored.index(i)] for i in ids])


def read_training_split(params: Params, category: str, resolution: int,
                        interpolation: str = "bicubic") -> list[np.ndarray]:
    """All raw training images of the category, padded square and resized (published option)."""
    from pipeline.data import list_samples, read_rgb

    refs = list_samples(params.data.dataset, params.data.root, category, "train")
    if not refs:
        raise InputError(f"{params.data.root}/{category}: empty training split")
    return [resize_rgb(to_square(read_rgb(ref.rgb)), resolution, interpolation)
            for ref in track(refs, f"reading {category} training split")]


def read_original_shots(params: Params, category: str, ids: list[str]) -> list[np.ndarray]:
    """The shots' original RGB from the dataset, padded to a square with zeros as prepare pads."""
    from pipeline.data import list_samples, read_rgb
    from pipeline.data.preprocess import pad_square

    refs = {ref.id: ref for ref in list_samples(params.data.dataset, params.data.root,
                                                category, "train")}
    missing = [i for i in ids if i not in refs]
    if missing:
        raise InputError(f"{params.data.root}/{category}: shot ids {missing} from shots.json are "
                         "not in the dataset's training split")
    return [pad_square(read_rgb(refs[i].rgb)) for i in ids]


def _lora_config(params: Params, token: str) -> LoraTraining:
    a = params.augment
    inversion = None
    if a.learns_token():
        inversion = TextualInversion(token=token, **a.textual_inversion.model_dump())
    return LoraTraining(
        rank=a.lora_rank, targets=tuple(a.lora_targets), train_text_encoder=a.train_text_encoder,
        lr=a.lr, steps=a.steps, resolution=a.resolution, color_jitter=tuple(a.color_jitter),
        seed=a.seed, text_encoder_lr=a.text_encoder_lr, weight_decay=a.weight_decay,
        lr_schedule=a.lr_schedule, warmup_steps=a.lr_warmup_steps, grad_clip=a.grad_clip,
        timestep_fraction=a.timestep_fraction, hflip=a.hflip, interpolation=a.interpolation,
        cache_latents=a.cache_latents, inversion=inversion,
    )


def _dtype(device: torch.device, name: str) -> torch.dtype:
    """The requested precision on CUDA; float32 on a CPU (half precision is slow there)."""
    return getattr(torch, name) if device.type == "cuda" else torch.float32


def _write_disabled(params: Params, out_dir: Path, section: dict) -> None:
    """``augment.n_per_shot: 0``: an empty LoRA marker and an empty generated store, so the
    stage's declared outputs exist."""
    base, size, resolution = params.models.diffusion, params.data.size, params.augment.resolution
    with atomic_dir(out_dir) as tmp:
        save_empty_lora(tmp / LORA_FILE, base)
        with StoreWriter(tmp / "generated.zarr",
                         attrs=_generated_attrs([], [], [], section, {"model": base}, {})) as w:
            w.create("rgb", n=0, sample_shape=(size, size, 3), dtype="uint8")
            w.create("rgb_full", n=0, sample_shape=(resolution, resolution, 3), dtype="uint8")


def _check_model(a: Any, pipe: Any, spec: str, token: str, prompt: str) -> None:
    """What only the loaded model can tell: the resolution fits its VAE (an error); the prompt
    or the tokenizer do not know the placeholder token (a note)."""
    if a.resolution % pipe.vae_scale_factor:
        raise ParamsError(
            f"augment.resolution: {a.resolution} is not a multiple of the VAE's scale factor "
            f"{pipe.vae_scale_factor} ({spec})"
        )
    if token not in prompt:
        info(f"note: augment.prompt {prompt!r} does not contain augment.placeholder_token "
             f"{token!r}")
    vocab = pipe.tokenizer.get_vocab()
    if not a.learns_token() and token not in vocab and f"{token}</w>" not in vocab:
        info(f"note: placeholder token {token!r} is not one token of this tokenizer")


def _training_images(params: Params, category: str, shot_rgb: list[np.ndarray]) -> list[np.ndarray]:
    a = params.augment
    if a.train_on == "shots":
        return [resize_rgb(img, a.resolution, a.interpolation) for img in shot_rgb]
    return read_training_split(params, category, a.resolution, a.interpolation)


def _lora_plan(a: Any, category: str) -> str:
    if a.lora == "official":
        return f"released LoRA {released_path(a.lora_checkpoints, category)}"
    where = "the k shots" if a.train_on == "shots" else "the full training split"
    return (f"{a.textual_inversion.steps} textual inversion steps, LoRA rank {a.lora_rank}, "
            f"{a.steps} steps on {where}")


def _load_released(params: Params, pipe: Any, category: str, token: str) -> LoraSnapshot:
    """``augment.lora: official``: the published lora_pti file of the category, converted and
    loaded into ``pipe`` through this project's own LoRA files (as a trained one reloads)."""
    import tempfile

    base = params.models.diffusion
    snapshot = released_snapshot(pipe, released_path(params.augment.lora_checkpoints, category),
                                 token)
    with tempfile.TemporaryDirectory(prefix="cmds-ad-lora-") as folder:
        load_lora(pipe, write_lora(snapshot, Path(folder), LORA_FILE, base), base)
    return snapshot


def _released_record(params: Params, category: str) -> dict[str, str]:
    """Provenance of a released LoRA: its file and sha256."""
    from pipeline.artifacts import file_sha256

    if params.augment.lora != "official":
        return {}
    path = released_path(params.augment.lora_checkpoints, category)
    return {"released": str(path), "sha256": file_sha256(path)}


def _generate_and_write(pipe: Any, a: Any, shot_rgb: list[np.ndarray], prompt: str,
                        seeds_per_shot: list[list[int]], writer: StoreWriter, size: int,
                        background: BackgroundWriter, clock: ModelClock, label: str,
                        out_interpolation: str = "bicubic") -> None:
    """img2img variations of each shot on this thread, resized to ``size`` with
    ``out_interpolation`` (data.rgb_interpolation); their appends to ``writer`` queued on the
    background thread (in shot order)."""
    for index in track(range(len(shot_rgb)), f"generating {label}"):
        full, small = generate(  # [n, R, R, 3] and [n, S, S, 3] uint8
            pipe, shot_rgb[index], prompt, seeds_per_shot[index], strength=a.strength,
            guidance=a.guidance, inference_steps=a.inference_steps, resolution=a.resolution,
            out_size=size, out_interpolation=out_interpolation,
            generator_device=a.generator_device, clock=clock,
        )
        background.submit(writer.append, "rgb", small)
        background.submit(writer.append, "rgb_full", full)


@dataclass(frozen=True)
class _Plan:
    """What one augment instance generates, known before any model loads."""

    token: str
    prompt: str
    train_prompts: list[str]
    seeds_per_shot: list[list[int]]
    gen_ids: list[str]  # gen/<shot id>/<j>, shot-major
    source_ids: list[str]  # the shot each image comes from
    seeds: list[int]  # each image's seed


def _plan(a: AugmentParams, category: str, shot_ids: list[str], shots: int, seed: int) -> _Plan:
    # the templates and the step count were checked with the params
    token = a.placeholder_token.format(category=category)
    prompt = a.prompt.format(category=category, token=token)
    train_prompts = [prompt] if a.train_prompts == "fixed" else \
        [t.format(token) for t in OBJECT_TEMPLATES]
    seeds_per_shot = shot_seeds(a.image_seeds, a.n_per_shot, a.seed, shots, seed, len(shot_ids))
    return _Plan(
        token, prompt, train_prompts, seeds_per_shot,
        gen_ids=[f"gen/{shot_id}/{j}" for shot_id in shot_ids for j in range(a.n_per_shot)],
        source_ids=[shot_id for shot_id in shot_ids for _ in range(a.n_per_shot)],
        seeds=[s for per_shot in seeds_per_shot for s in per_shot],
    )


def _adapt(params: Params, pipe: Any, category: str, plan: _Plan, shot_rgb: list,
           clock: ModelClock) -> tuple[list, dict]:
    """Train the LoRA on the shots, or load the released one: (losses, a copy of the adapters
    taken before the pipeline may change precision)."""
    a = params.augment
    if a.lora == "official":
        return [], _load_released(params, pipe, category, plan.token)
    losses = train_lora(pipe, _training_images(params, category, shot_rgb), plan.train_prompts,
                        _lora_config(params, plan.token), clock)
    return losses, lora_snapshot(pipe, a.train_text_encoder,
                                 plan.token if a.learns_token() else None)


def run(params: Params, category: str, shots: int, seed: int = 0) -> dict[str, float]:
    """Train the LoRA, generate, write the artifacts; returns timing figures (benchmark)."""
    started = time.perf_counter()
    a, size, base = params.augment, params.data.size, params.models.diffusion
    out_dir, section = layout.augmented(category, shots, seed), section_dict(a)
    # 1. The shots (and nothing more when augmentation is off)
    shot_ids = layout.read_shot_ids(category, shots, seed)
    shot_rgb = list(read_shot_images(category, shot_ids, size))
    if a.n_per_shot == 0 or params.fit_mapper.mappers == "official":
        # Released mappers are converted, not trained: nothing reads generated images, so
        # the LoRA and img2img (hours on a GPU) are skipped; the empty store keeps the graph.
        why = "augment.n_per_shot is 0" if a.n_per_shot == 0 else \
            "fit_mapper.mappers is official (released mappers read no generated images)"
        info(f"augment {category} k={shots}: {why}, augmentation disabled")
        _write_disabled(params, out_dir, section)
        return {"lora_steps": 0.0, "lora_s": 0.0, "images": 0.0, "generate_s": 0.0,
                "model_s": 0.0, "load_s": 0.0, "total_s": time.perf_counter() - started}
    # 2. Prompts, ids and seeds of every image, before any is generated
    plan = _plan(a, category, shot_ids, shots, seed)
    if a.image_source == "original":
        shot_rgb = read_original_shots(params, category, shot_ids)
    device = pick_device()
    # before CUDA initialises (cuBLAS reads its workspace setting)
    with deterministic(device, warn_only=True):
        # 3. The base model (in its generation precision when nothing trains)
        gen_dtype = _dtype(device, a.precision)
        train_dtype = gen_dtype if a.lora == "official" else _dtype(device, a.train_precision)
        loading = time.perf_counter()
        pipe, source = load_img2img(base, params.models.cache_dir, device, train_dtype)
        load_s = time.perf_counter() - loading
        info(f"augment {category} k={shots} seed={seed}: base model {source.spec} "
             f"({source.kind}) on {device}; {_lora_plan(a, category)}; "
             f"{a.n_per_shot} images per shot; prompt {plan.prompt!r}")
        _check_model(a, pipe, source.spec, plan.token, plan.prompt)
        train_clock, gen_clock = ModelClock(device), ModelClock(device)
        with demo_threads(device, source):
            # 4. Train, or load the released LoRA
            losses, snapshot = _adapt(params, pipe, category, plan, shot_rgb, train_clock)
            if gen_dtype != train_dtype:
                pipe.to(dtype=gen_dtype)
            use_euler_ancestral(pipe)
            # 5. Generate; a helper thread writes the LoRA file and the store meanwhile. The
            # output folder opens only now, so bad parameters found while training starts
            # leave no folder behind; a failed write re-raises here and the folder goes.
            with atomic_dir(out_dir) as tmp, BackgroundWriter() as background:
                attrs = _generated_attrs(
                    plan.gen_ids, plan.source_ids, plan.seeds, section, model_info(source),
                    {"lora": lora_summary(losses) or _released_record(params, category),
                     "prompt": plan.prompt, "token": plan.token,
                     "precision": str(pipe.dtype).replace("torch.", "")})
                writer = StoreWriter(tmp / "generated.zarr", attrs=attrs)
                background.submit(write_lora, snapshot, tmp, LORA_FILE, base)
                background.submit(_open_generated, writer, len(plan.gen_ids), size, a.resolution)
                _generate_and_write(pipe, a, shot_rgb, plan.prompt, plan.seeds_per_shot, writer,
                                    size, background, gen_clock, f"{category} k={shots}",
                                    params.data.rgb_interpolation)
                background.submit(writer.__exit__, None, None, None)
    return {"lora_steps": float(len(losses)), "lora_s": train_clock.seconds,
            "images": float(len(plan.gen_ids)), "generate_s": gen_clock.seconds,
            "model_s": train_clock.seconds + gen_clock.seconds, "load_s": load_s,
            "total_s": time.perf_counter() - started}


def _generated_attrs(ids: list[str], source_ids: list[str], seeds: list[int], section: dict,
                     model: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    attrs = {"ids": ids, "source_ids": source_ids, "seeds": seeds, "base_model": model["model"]}
    attrs.update(provenance("augment", section, model=model, **extra))
    return attrs


def _open_generated(writer: StoreWriter, n: int, size: int, resolution: int) -> None:
    writer.__enter__()
    writer.create("rgb", n=n, sample_shape=(size, size, 3), dtype="uint8")
    writer.create("rgb_full", n=n, sample_shape=(resolution, resolution, 3), dtype="uint8")
