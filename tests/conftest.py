"""Test settings: offline, quiet, deterministic, and shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub call fails in a second, not a minute
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["CMDS_AD_QUIET"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
METRIC_FIXTURES = SHARED / "fixtures" / "metrics"


@pytest.fixture(scope="session")
def metric_fixtures() -> Path:
    if not METRIC_FIXTURES.is_dir():
        pytest.skip(f"metric fixtures not found at {METRIC_FIXTURES}")
    return METRIC_FIXTURES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on the shared 2-core machine oversubscribed
    threads slow model tests ten-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
