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
