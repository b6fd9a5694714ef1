"""The quick-look overlay's outlines equal skimage's `find_boundaries` (which the overlay no longer imports)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries

from ra_engine.detection.overlay import _outline, _per_slice_sums


@pytest.mark.parametrize("mode", ["outer", "inner"])
def test_outlines_equal_skimage_find_boundaries(mode):
    rng = np.random.default_rng(0)
    for trial in range(300):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.random()
        if trial % 3 == 0:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(0, 3)))
        assert np.array_equal(_outline(mask, mode), find_boundaries(mask, mode=mode)), (trial, mode)


def test_per_slice_sums_equal_float_sums():
    rng = np.random.default_rng(1)
    labels = (rng.random((12, 20, 16)) < 0.1).astype(np.uint8)
    values = rng.random((12, 20, 16)).astype(np.float32)
    for axis in range(3):
        for array in (labels, labels > 0, values):
            expected = np.moveaxis(np.asarray(array, dtype=float), axis, 0).reshape(array.shape[axis], -1).sum(1)
            assert np.array_equal(_per_slice_sums(array, axis), expected)
