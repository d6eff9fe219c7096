"""LoRA training: pivotal tuning (the published recipe, cloneofsimo ``lora_pti``), built on
diffusers and peft:

1. textual inversion (``augment.textual_inversion_steps`` > 0): a new placeholder token is added
   to the tokenizer, the text encoder's embedding matrix grows by one row (random init, std
   ``textual_inversion_init_std``) and only that row learns (every other row is restored after
   each optimiser step); the whole model is otherwise frozen;
2. LoRA: peft adapters (``lora_alpha = rank``, so the adapter scale is 1; A gaussian, B zero, as
   ``lora_pti``) on the UNet Linear layers named in ``augment.lora_targets`` and optionally on
   the text encoder's attention, with AdamW, per-group learning rates, an LR schedule with
   warm-up, gradient clipping and a timestep cap; the new token's row can keep learning
   (``continue_inversion_lr``).

The loss is the standard noise-prediction MSE on VAE latents (epsilon or v target, as the
scheduler config says); batch 1. With ``textual_inversion_steps: 0``, ``lora_targets`` on the
attention projections, one fixed prompt and no schedule/clip/cap, this is the plain diffusers
text-to-image LoRA recipe (the demo's).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment.images import augment_image, resize_rgb
from pipeline.determinism import deterministic
from pipeline.errors import ModelError, ParamsError
from pipeline.models.diffusion import ModelClock
from pipeline.progress import track

# Every Linear of CLIP's attention (lora_pti's ``CLIPSdpaAttention`` target in the published run).
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# lora_pti's "object" caption templates (dataset.py); ``{}`` is the placeholder token.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)


@dataclass(frozen=True)
class TextualInversion:
    """Learning a new placeholder token (phase 1 of pivotal tuning)."""

    token: str
    steps: int = 1000  # micro-steps (one image each); 0 = add the token, learn it only later
    lr: float = 2e-3
    accumulation: int = 1  # micro-steps per optimiser step
    init_std: float = 0.017
    norm_target: float = 0.0  # lora_pti's clip_ti_decay towards this norm; 0 = off
    continue_lr: float = 0.0  # the row keeps learning during LoRA tuning at this LR; 0 = off


@dataclass(frozen=True)
class LoraTraining:
    """What one LoRA fine-tuning run needs (the ``augment`` params, minus generation)."""

    rank: int
    targets: tuple[str, ...]
    train_text_encoder: bool
    lr: float
    steps: int
    resolution: int
    color_jitter: tuple[float, ...]  # (brightness, contrast, saturation, hue) as torchvision
    seed: int
    text_encoder_lr: float | None = None  # None = ``lr``
    weight_decay: float = 1e-2  # torch's AdamW default
    lr_schedule: str = "constant"  # "constant" | "linear" (diffusers' schedules)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    timestep_fraction: float = 1.0  # LoRA steps draw t in [0, fraction * T)
    hflip: float = 0.0
    interpolation: str = "bicubic"
    cache_latents: bool = False
    inversion: TextualInversion | None = None



# --------------------------------------------------------------------------------------------
# Training: pure pieces (tested on their own)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                      total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' LR schedule by name; ``constant`` with a warm-up is constant_with_warmup."""
    from diffusers.optimization import get_scheduler

    if schedule not in ("constant", "linear"):
        raise ParamsError(f"augment.lr_schedule: unknown schedule {schedule!r} (constant, linear)")
    name = "constant_with_warmup" if schedule == "constant" and warmup_steps else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=max(total_steps, 1))


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Step the schedule BEFORE the optimiser step, as lora_pti does (so the first update uses
    the schedule's value at step 1: with a warm-up of W steps, lr / W)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        scheduler.step()


def tuning_param_groups(unet_params: Sequence[torch.nn.Parameter],
                        text_params: Sequence[torch.nn.Parameter],
                        embedding: torch.nn.Parameter | None,
                        cfg: LoraTraining) -> list[dict[str, Any]]:
    """AdamW parameter groups of the LoRA phase: UNet LoRA, text-encoder LoRA, token row."""
    groups: list[dict[str, Any]] = [{"params": list(unet_params), "lr": cfg.lr, "name": "unet"}]
    if text_params:
        te_lr = cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
        groups.append({"params": list(text_params), "lr": te_lr, "name": "text_encoder"})
    if embedding is not None and cfg.inversion is not None and cfg.inversion.continue_lr > 0:
        groups.append({"params": [embedding], "lr": cfg.inversion.continue_lr, "name": "token"})
    return groups


def make_tuning_optimizer(groups: list[dict[str, Any]], cfg: LoraTraining
                          ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return optimizer, make_lr_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)


def sample_timestep(num_train_timesteps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A training timestep in [0, int(fraction * T)), as lora_pti's ``t_mutliplier``."""
    high = max(1, int(num_train_timesteps * fraction))
    return torch.randint(high, (1,), generator=generator)


def clip_gradients(params: Sequence[torch.nn.Parameter], max_norm: float) -> float | None:
    """Clip the global gradient norm (0 = off); returns the norm before clipping."""
    if max_norm <= 0:
        return None
    return float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm))


def decay_token_norm(row: torch.Tensor, lr: float, target: float) -> torch.Tensor:
    """lora_pti's ``clip_ti_decay``: move the row's norm towards ``target`` by min(1, 100 lr)."""
    norm = row.norm(dim=-1, keepdim=True)
    lam = min(1.0, 100.0 * lr)
    return F.normalize(row, dim=-1) * (norm + lam * (target - norm))


def add_placeholder_token(pipe: Any, token: str, init_std: float, seed: int) -> int:
    """Add ``token`` to the tokenizer, grow the embedding matrix, draw its row; returns its id."""
    if not token or token.split() != [token]:
        raise ParamsError(f"augment.placeholder_token: {token!r} must be one word (no spaces)")
    vocab = pipe.tokenizer.get_vocab()
    # CLIP's vocabulary spells whole words with "</w>": "sks" is the existing "sks</w>".
    if token in vocab or f"{token}</w>" in vocab or pipe.tokenizer.add_tokens(token) == 0:
        raise ParamsError(
            f"augment.placeholder_token: {token!r} is already a token of this tokenizer; "
            "textual inversion needs a new one (e.g. '<{category}>')"
        )
    token_id = int(pipe.tokenizer.convert_tokens_to_ids(token))
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    weight = pipe.text_encoder.get_input_embeddings().weight
    row = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed)) * init_std
    with torch.no_grad():
        weight[token_id] = row.to(weight.device, weight.dtype)
    return token_id


def add_lora(pipe: Any, cfg: LoraTraining) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Attach fresh LoRA adapters with peft; returns the (UNet, text encoder) trainable params."""
    from peft import LoraConfig, inject_adapter_in_model

    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # peft draws the initial A matrices from the global RNG
    try:
        pipe.unet.add_adapter(
            LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                       target_modules=list(cfg.targets))
        )
    except ValueError as err:
        raise ParamsError(f"augment.lora_targets: {err}") from None
    if cfg.train_text_encoder:
        # peft's own injection: transformers' ``add_adapter`` demands a newer peft than exists
        # for this transformers release; the adapter (and its state dict) are the same.
        inject_adapter_in_model(
            LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                       target_modules=list(TEXT_ENCODER_TARGETS)),
            pipe.text_encoder, adapter_name="default",
        )

    def trainable(module: Any) -> list[torch.nn.Parameter]:
        out = []
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # fp32 LoRA weights over fp16 base weights
                out.append(param)
        return out

    return trainable(pipe.unet), trainable(pipe.text_encoder)


# --------------------------------------------------------------------------------------------
# Training loop


class _Examples:
    """The training examples and the loss of one step (batch 1). Every random draw comes from
    one seeded generator, in a fixed order, so a run is reproducible."""

    def __init__(self, pipe: Any, images: Sequence[np.ndarray], prompts: Sequence[str],
                 cfg: LoraTraining) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.cfg = pipe, cfg
        self.device = pipe.unet.device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction = self.noise_scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ModelError(f"models.diffusion: unsupported prediction type {self.prediction!r}")
        self.pixels = [  # each (3, R, R) in [0, 1]
            torch.from_numpy(np.array(resize_rgb(img, cfg.resolution, cfg.interpolation)))
            .permute(2, 0, 1).float() / 255.0
            for img in images
        ]
        self.tokens = pipe.tokenizer(  # [P, 77]
            list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        # A diffusers model's ``.dtype`` walks its parameters on every access; read it once.
        self.vae_dtype, self.unet_dtype = pipe.vae.dtype, pipe.unet.dtype
        self.half_weights = self.unet_dtype == torch.float16
        self.cached: list[tuple[torch.Tensor, int]] | None = None

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def view(self, index: int) -> tuple[torch.Tensor, int]:
        """A training view of image ``index`` and the index of a random prompt."""
        x = augment_image(self.pixels[index], self.cfg, self.generator)
        return x, self._draw(len(self.tokens))

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """VAE latents of one view, [1, 4, R/8, R/8] float32, sampled with ``seed``."""
        device = self.device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16,
                                             enabled=device.type == "cuda" and self.half_weights):
            dist = self.pipe.vae.encode(x[None].to(device, self.vae_dtype)).latent_dist
            sample = dist.sample(torch.Generator().manual_seed(seed))
            return (sample * self.pipe.vae.config.scaling_factor).float()

    def cache_latents(self) -> None:
        """lora_pti's default (cached_latents): each image augmented, captioned, encoded once."""
        self.cached = []
        for index in range(len(self.pixels)):
            x, prompt_index = self.view(index)
            self.cached.append((self.encode(x, self._draw(2**62)), prompt_index))

    def encode_text(self, prompt_index: int) -> torch.Tensor:
        # Called inside loss()'s autocast region (lora_pti autocasts both models together).
        return self.pipe.text_encoder(self.tokens[prompt_index : prompt_index + 1])[0]

    def loss(self, fraction: float, text: Callable[[int], torch.Tensor], amp: bool) -> torch.Tensor:
        """The noise-prediction MSE of one example at a timestep below ``fraction`` x T."""
        noise_seed = self._draw(2**62)
        if self.cached is not None:
            latents, prompt_index = self.cached[self._draw(len(self.cached))]
        else:
            x, prompt_index = self.view(self._draw(len(self.pixels)))
            latents = self.encode(x, noise_seed)
        step_gen = torch.Generator().manual_seed(noise_seed + 1)
        noise = torch.randn(latents.shape, generator=step_gen).to(self.device)
        scheduler = self.noise_scheduler
        timesteps = sample_timestep(scheduler.config.num_train_timesteps, fraction,
                                    step_gen).to(self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=amp):
            pred = self.pipe.unet(noisy.to(self.unet_dtype), timesteps, text(prompt_index)).sample
        target = noise if self.prediction == "epsilon" else \
            scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float())


class _TokenRow:
    """The embedding matrix while only the placeholder token's row may learn: the other rows
    are restored after each optimiser step and at the end (lora_pti saves only the token's
    row, so the model it generates with has the original rows)."""

    def __init__(self, pipe: Any, token_id: int) -> None:
        self.token_id = token_id
        self.embedding = pipe.text_encoder.get_input_embeddings().weight
        self.embedding.data = self.embedding.data.float()  # the row stays fp32 over fp16 weights
        self.original = self.embedding.detach().clone()
        self.keep = torch.ones(self.embedding.shape[0], dtype=torch.bool,
                               device=self.embedding.device)
        self.keep[token_id] = False

    def restore_others(self) -> None:
        with torch.no_grad():
            self.embedding[self.keep] = self.original[self.keep]


def invert_token(examples: _Examples, row: _TokenRow, inv: TextualInversion, schedule: str,
                 clock: ModelClock) -> list[float]:
    """Phase 1, textual inversion: only the embedding matrix trains (the other rows are
    restored after each optimiser step); returns the loss of each micro-step."""
    pipe, embedding = examples.pipe, row.embedding
    embedding.requires_grad_(True)
    pipe.text_encoder.train()
    optimizer = torch.optim.AdamW([embedding], lr=inv.lr, weight_decay=0.0)
    scheduler = make_lr_scheduler(optimizer, schedule, 0, inv.steps)
    # Full precision as published (no autocast) unless the base weights are fp16.
    amp = examples.device.type == "cuda" and examples.half_weights
    losses = []
    for step in track(range(inv.steps), "textual inversion", total=inv.steps):
        advance_schedule(scheduler)
        with clock():
            loss = examples.loss(1.0, examples.encode_text, amp) / inv.accumulation
            loss.backward()
            # lora_pti steps at micro-steps 0, A, 2A, ... (its counter starts at 0).
            if step % inv.accumulation == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    if inv.norm_target > 0:
                        embedding[row.token_id] = decay_token_norm(
                            embedding[row.token_id], scheduler.get_last_lr()[0], inv.norm_target)
                    row.restore_others()
        losses.append(float(loss.detach()) * inv.accumulation)
    embedding.grad = None
    embedding.requires_grad_(False)
    return losses


def tune_lora(examples: _Examples, cfg: LoraTraining, row: _TokenRow | None,
              clock: ModelClock) -> list[float]:
    """Phase 2: fresh LoRA adapters train (and the token's row, with ``continue_lr``);
    returns the loss of each step."""
    pipe = examples.pipe
    unet_params, text_params = add_lora(pipe, cfg)
    learn_row = row is not None and cfg.inversion is not None and cfg.inversion.continue_lr > 0
    if learn_row:
        row.embedding.requires_grad_(True)
    groups = tuning_param_groups(unet_params, text_params,
                                 row.embedding if learn_row else None, cfg)
    optimizer, scheduler = make_tuning_optimizer(groups, cfg)
    trainable = [p for g in groups for p in g["params"]]
    amp = examples.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp and examples.half_weights)
    pipe.unet.train()
    if cfg.train_text_encoder or learn_row:
        pipe.text_encoder.train()
        text_fn = examples.encode_text
    else:  # the prompts' hidden states once: the text encoder does not change
        with clock(), torch.no_grad(), torch.autocast(examples.device.type, dtype=torch.float16,
                                                      enabled=amp):
            fixed = [examples.encode_text(i) for i in range(len(examples.tokens))]
        text_fn = fixed.__getitem__
    losses = []
    for _ in track(range(cfg.steps), "LoRA training", total=cfg.steps):
        advance_schedule(scheduler)
        with clock():
            optimizer.zero_grad(set_to_none=True)
            loss = examples.loss(cfg.timestep_fraction, text_fn, amp)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                clip_gradients(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        losses.append(float(loss.detach()))
    if row is not None:
        row.embedding.requires_grad_(False)
    return losses


def train_lora(
    pipe: Any,
    images: Sequence[np.ndarray],
    prompts: str | Sequence[str],
    cfg: LoraTraining,
    clock: ModelClock | None = None,
) -> list[float]:
    """Pivotal tuning of ``pipe`` on uint8 (H, W, 3) square images; returns the losses of
    both phases in order (textual inversion micro-steps first, then LoRA steps).

    ``prompts``: one prompt, or templates already formatted with the token; each step uses a
    random one. With ``cfg.inversion`` the placeholder token is added to ``pipe`` first.
    """
    # 1. Check the inputs
    if not images:
        raise ValueError("no training images")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no training prompts")
    clock = clock or ModelClock()
    inv = cfg.inversion
    with deterministic(pipe.unet.device, warn_only=True):
        # 2. Freeze the model; add the placeholder token
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        token_id = add_placeholder_token(pipe, inv.token, inv.init_std, cfg.seed) if inv else None
        # 3. The examples, encoded once with cache_latents
        examples = _Examples(pipe, images, prompts, cfg)
        if cfg.cache_latents:
            with clock():
                examples.cache_latents()
        row = _TokenRow(pipe, token_id) if token_id is not None else None
        # 4. Phase 1: textual inversion
        losses = []
        if inv is not None and row is not None and inv.steps > 0:
            losses += invert_token(examples, row, inv, cfg.lr_schedule, clock)
        # 5. Phase 2: LoRA tuning (with the token's row, optionally)
        losses += tune_lora(examples, cfg, row, clock)
        # 6. The model as it generates: original rows but the token's, eval mode
        if row is not None:
            row.restore_others()
        pipe.unet.eval()
        pipe.text_encoder.eval()
    return losses


def lora_summary(losses: Sequence[float]) -> dict[str, Any]:
    """Loss figures kept in provenance (first/last mean over up to 10 steps)."""
    if not losses:
        return {}
    head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)):]
    return {"loss_first": float(np.mean(head)), "loss_last": float(np.mean(tail)),
            "steps": len(losses)}
