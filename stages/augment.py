"""Stage ``augment``: LoRA fine-tuning on the shots and img2img generation (DESIGN 1.3).

Reads  ``artifacts/prepare/<cat>/train.zarr`` (``rgb``, attrs ``ids``) and ``shots.json``;
       with ``augment.train_on: train_split`` also the raw training images of the dataset
       (the published behaviour, which trains the LoRA on normal data beyond the k shots).
Writes ``artifacts/augment/<cat>/k<k>-s<seed>/`` (one atomic directory):
       ``lora.safetensors`` (diffusers LoRA format + base model id in its metadata) and
       ``generated.zarr`` (``rgb`` (M, S, S, 3) uint8; attrs ``ids`` = ``gen/<shot id>/<j>``,
       ``source_ids``, ``seeds``, ``base_model``, provenance).
``augment.n_per_shot: 0`` disables augmentation: no model is loaded, ``generated.zarr`` is
empty (M = 0) and ``lora.safetensors`` is an empty marker (no tensors, metadata
``cmds_ad.status = empty``), so DVC's declared outputs exist.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.artifacts import StoreWriter, atomic_dir, open_store, provenance
from pipeline.augment import (
    LoraTraining,
    check_generation,
    deterministic_torch,
    generate,
    image_seed,
    lora_snapshot,
    lora_summary,
    resize_rgb,
    save_empty_lora,
    to_square,
    train_lora,
    use_euler_ancestral,
    write_lora,
)
from pipeline.device import inference_dtype, pick_device
from pipeline.errors import InputError, ParamsError
from pipeline.models.diffusion import ModelClock, demo_threads, load_img2img, model_info
from pipeline.params import Params, section_dict
from pipeline.progress import info, track
from stages import layout

LORA_FILE = "lora.safetensors"


def read_shot_images(category: str, ids: list[str], size: int) -> np.ndarray:
    store = open_store(layout.prepared(category) / "train.zarr")
    stored = list(store.attrs.get("ids", []))
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


def read_training_split(params: Params, category: str, resolution: int) -> list[np.ndarray]:
    """All raw training images of the category, padded square and resized (published option)."""
    from pipeline.data import list_samples, read_rgb

    refs = list_samples(params.data.dataset, params.data.root, category, "train")
    if not refs:
        raise InputError(f"{params.data.root}/{category}: empty training split")
    return [resize_rgb(to_square(read_rgb(ref.rgb)), resolution)
            for ref in track(refs, f"reading {category} training split")]


def _lora_config(params: Params) -> LoraTraining:
    a = params.augment
    return LoraTraining(
        rank=a.lora_rank, targets=tuple(a.lora_targets), train_text_encoder=a.train_text_encoder,
        lr=a.lr, steps=a.steps, resolution=a.resolution, color_jitter=a.color_jitter, seed=a.seed,
    )


def run(params: Params, category: str, shots: int, seed: int = 0) -> dict[str, float]:
    """Train the LoRA, generate, write the artifacts; returns timing figures (benchmark)."""
    started = time.perf_counter()
    a = params.augment
    size = params.data.size
    shot_ids = layout.read_shot_ids(category, shots, seed)
    shot_rgb = read_shot_images(category, shot_ids, size)
    out_dir = layout.augmented(category, shots, seed)
    base = params.models.diffusion
    section = section_dict(a)

    if a.n_per_shot == 0:
        info(f"augment {category} k={shots}: augment.n_per_shot is 0, augmentation disabled")
        with atomic_dir(out_dir) as tmp:
            save_empty_lora(tmp / LORA_FILE, base)
            with StoreWriter(tmp / "generated.zarr",
                             attrs=_generated_attrs([], [], [], section, {"model": base}, {})) as w:
                w.create("rgb", n=0, sample_shape=(size, size, 3), dtype="uint8")
        return {"lora_steps": 0.0, "lora_s": 0.0, "images": 0.0, "generate_s": 0.0,
                "model_s": 0.0, "load_s": 0.0, "total_s": time.perf_counter() - started}

    check_generation(a.strength, a.inference_steps)
    try:
        prompt = a.prompt.format(category=category)
    except (KeyError, IndexError, ValueError) as err:
        raise ParamsError(f"augment.prompt: bad template {a.prompt!r} ({err})") from None
    device = pick_device()
    deterministic_torch(device)  # before CUDA initialises (cuBLAS reads its workspace setting)
    loading = time.perf_counter()
    pipe, source = load_img2img(base, params.models.cache_dir, device, inference_dtype(device))
    load_s = time.perf_counter() - loading
    info(f"augment {category} k={shots} seed={seed}: base model {source.spec} ({source.kind}) "
         f"on {device}; LoRA rank {a.lora_rank}, {a.steps} steps on "
         f"{'the k shots' if a.train_on == 'shots' else 'the full training split'}; "
         f"{a.n_per_shot} images per shot; prompt {prompt!r}")
    if a.resolution % pipe.vae_scale_factor:
        raise ParamsError(
            f"augment.resolution: {a.resolution} is not a multiple of the VAE's scale factor "
            f"{pipe.vae_scale_factor} ({source.spec})"
        )
    if a.placeholder_token not in prompt.split():
        info(f"note: augment.prompt {prompt!r} does not contain augment.placeholder_token "
             f"{a.placeholder_token!r}")
    vocab = pipe.tokenizer.get_vocab()
    if a.placeholder_token not in vocab and f"{a.placeholder_token}</w>" not in vocab:
        info(f"note: placeholder token {a.placeholder_token!r} is not one token of this tokenizer")

    if a.train_on == "shots":
        train_images = [resize_rgb(img, a.resolution) for img in shot_rgb]
    else:
        train_images = read_training_split(params, category, a.resolution)

    # Every image's id, source shot and seed are known before any is generated.
    shot_seeds = [[image_seed(a.seed, shots, seed, index, j) for j in range(a.n_per_shot)]
                  for index in range(len(shot_ids))]
    gen_ids = [f"gen/{shot_id}/{j}" for shot_id in shot_ids for j in range(a.n_per_shot)]
    source_ids = [shot_id for shot_id in shot_ids for _ in range(a.n_per_shot)]
    seeds = [s for per_shot in shot_seeds for s in per_shot]
    train_clock, gen_clock = ModelClock(device), ModelClock(device)
    with demo_threads(device, source):
        losses = train_lora(pipe, train_images, prompt, _lora_config(params), train_clock)
        use_euler_ancestral(pipe)
        # The temporary output folder opens only now, so bad parameters found while training
        # starts leave no folder behind.
        with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(max_workers=1) as background:
            # A helper thread writes the LoRA file and the generated store while the images
            # are generated (generation reads the adapters but never changes them). It runs
            # its jobs in submission order; a failed job re-raises below, so atomic_dir
            # discards the folder.
            attrs = _generated_attrs(gen_ids, source_ids, seeds, section, model_info(source),
                                     {"lora": lora_summary(losses), "prompt": prompt,
                                      "precision": str(pipe.dtype).replace("torch.", "")})
            writer = StoreWriter(tmp / "generated.zarr", attrs=attrs)
            jobs = [
                background.submit(lambda: write_lora(lora_snapshot(pipe, a.train_text_encoder),
                                                     tmp, LORA_FILE, base)),
                background.submit(_open_generated, writer, len(gen_ids), size),
            ]
            for index in track(range(len(shot_ids)), f"generating {category} k={shots}"):
                images = generate(
                    pipe, shot_rgb[index], prompt, shot_seeds[index], strength=a.strength,
                    guidance=a.guidance, inference_steps=a.inference_steps,
                    resolution=a.resolution, out_size=size, clock=gen_clock,
                )
                jobs.append(background.submit(writer.append, "rgb", images))
            jobs.append(background.submit(writer.__exit__, None, None, None))
            for job in jobs:
                job.result()
    return {"lora_steps": float(len(losses)), "lora_s": train_clock.seconds,
            "images": float(len(gen_ids)), "generate_s": gen_clock.seconds,
            "model_s": train_clock.seconds + gen_clock.seconds, "load_s": load_s,
            "total_s": time.perf_counter() - started}


def _generated_attrs(ids: list[str], source_ids: list[str], seeds: list[int], section: dict,
                     model: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    attrs = {"ids": ids, "source_ids": source_ids, "seeds": seeds, "base_model": model["model"]}
    attrs.update(provenance("augment", section, model=model, **extra))
    return attrs


def _open_generated(writer: StoreWriter, n: int, size: int) -> None:
    writer.__enter__()
    writer.create("rgb", n=n, sample_shape=(size, size, 3), dtype="uint8")
