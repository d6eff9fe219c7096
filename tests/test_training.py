"""pipeline.training helpers that the fit_mapper stage tests do not reach directly."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.preprocess import resize_nearest
from pipeline.determinism import deterministic
from pipeline.training import resize_mask


def test_resize_mask_samples_cell_centres():
    # 32 px -> 4 cells of 8 px. Foreground in pixels 4..11 of each row: the right half of cell 0
    # and the left half of cell 1. Cell centres (pixels 4, 12, ...) decide: cell 0 only.
    fg = np.zeros((1, 32, 32), dtype=np.uint8)
    fg[:, :, 4:12] = 1
    out = resize_mask(fg, 4)
    assert out.dtype == np.float32 and out.shape == (1, 4, 4)
    np.testing.assert_array_equal(out[0, 0], [1, 0, 0, 0])


def test_resize_mask_agrees_with_the_preprocessing_nearest_resize():
    rng = np.random.default_rng(0)
    fg = (rng.uniform(size=(3, 224, 224)) < 0.5).astype(np.uint8)
    for resolution in (28, 56, 100, 224):
        expected = np.stack([resize_nearest(m, resolution) for m in fg]).astype(np.float32)
        np.testing.assert_array_equal(resize_mask(fg, resolution), expected)


def test_deterministic_restores_the_warn_only_flag_too():
    # an outer deterministic(warn_only=True) (augment's) stays on; training inside the same
    # process must not turn it into errors for what runs afterwards.
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with deterministic():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
