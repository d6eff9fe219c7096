"""Random-weight LoRA files in the published lora_pti layout (``final_lora.safetensors``), for
the paper-shape smoke run and the tests of ``augment.lora: official``.

The layout is the one ``pipeline/augment/lora_pti.py`` reads (published
``third_party/lora_diffusion/lora.py``, ``save_safeloras_with_embeds``): ``<model>:<i>:up``
(out, r) and ``<model>:<i>:down`` (r, in) in float16 for each adapted Linear layer in lora_pti's
order, the token's embedding row under the token, and the string metadata (target classes,
ranks, ``<token>: <embed>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.augment.lora_pti import EMBED_FLAG, RELEASED_FILE, adapted_layers

UNET_TARGETS = ["CrossAttention", "Attention", "GEGLU"]  # lora_pti's default
TEXT_TARGETS = ["CLIPSdpaAttention"]  # scripts/train_lora_mvtec3dad.py


def write_random_lora_pti(root: Path, category: str, unet: Any, text_encoder: Any, rank: int = 8,
                          seed: int = 0, std: float = 0.01) -> Path:
    """``<root>/<category>/final_lora.safetensors`` with seeded random weights for these
    models (they may be on the meta device: only their layer shapes are read)."""
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name, model, targets in (("unet", unet, UNET_TARGETS),
                                 ("text_encoder", text_encoder, TEXT_TARGETS)):
        metadata[name] = json.dumps(targets)
        for i, (_, layer) in enumerate(adapted_layers(model, targets)):
            metadata[f"{name}:{i}:rank"] = str(rank)
            weights[f"{name}:{i}:up"] = (torch.randn(layer.out_features, rank, generator=gen)
                                         * std).half()
            weights[f"{name}:{i}:down"] = (torch.randn(rank, layer.in_features, generator=gen)
                                           * std).half()
    token = f"<{category}>"
    width = text_encoder.get_input_embeddings().weight.shape[1]
    weights[token] = torch.randn(width, generator=gen) * std
    metadata[token] = EMBED_FLAG
    path = Path(root) / category / RELEASED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata=metadata)
    return path
