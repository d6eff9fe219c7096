"""Device and precision choice: CUDA when available, CPU otherwise."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """Half precision on CUDA (as the published code), float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32
