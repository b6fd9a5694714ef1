"""Region statistics over the flagged voxels agree with scipy.ndimage's full-array statistics."""
import numpy as np
from scipy import ndimage

from ra_engine.core.image import Geometry, Image
from ra_engine.detection.regions import find_regions


def test_region_peak_and_mean_equal_ndimage_over_the_full_map():
    rng = np.random.default_rng(0)
    anomaly = rng.random((30, 40, 45)).astype(np.float32)
    flagged = (ndimage.gaussian_filter(anomaly, 2) > 0.52).astype(np.uint8)
    geometry = Geometry((1.0, 1.0, 1.2), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    regions = find_regions(Image(flagged, geometry), Image(anomaly, geometry))

    labels, n = ndimage.label(flagged > 0, structure=np.ones((3, 3, 3), bool))
    index = np.arange(1, n + 1)
    peak = ndimage.maximum(anomaly.astype(np.float64), labels, index)
    mean = ndimage.mean(anomaly.astype(np.float64), labels, index)
    counts = np.bincount(labels.ravel())[1:]
    order = sorted(range(n), key=lambda k: (-counts[k], k))  # regions come largest first
    assert len(regions) == n > 10
    for region, k in zip(regions, order):
        assert region["voxels"] == counts[k]
        assert abs(region["max_anomaly"] - peak[k]) < 1e-5 and abs(region["mean_anomaly"] - mean[k]) < 1e-5
