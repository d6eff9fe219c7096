"""Deterministic torch kernels: the same inputs give the same bits on one device and thread
count (the stores are byte-identical, so DVC re-runs nothing downstream for nothing)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# cuBLAS's deterministic workspace (the value PyTorch's reproducibility notes give)
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


@contextmanager
def deterministic(device: torch.device | None = None, *, warn_only: bool = False) -> Iterator[None]:
    """Deterministic kernels while the block runs; the previous settings come back after it.

    On every device: torch's deterministic algorithms (``warn_only``: an operation without a
    deterministic kernel warns instead of raising). On CUDA also: cuDNN's deterministic kernels
    without autotuning, and ``CUBLAS_WORKSPACE_CONFIG`` unless the environment sets it. cuBLAS
    reads that variable when its first handle is created, so enter this before the first CUDA
    matrix product; the variable stays set (cuBLAS would not read it again).
    """
    cuda = device is not None and device.type == "cuda"
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]
