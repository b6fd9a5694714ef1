"""Connected regions of a detection label map, with their size and position in physical units (LPS, mm)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ra_engine.core.image import Image


def find_regions(detections: Image, anomaly: Image | None = None) -> list[dict]:
    """The connected regions of the non-zero pixels of `detections` ((z, y, x) or (y, x), LPS geometry), largest
    first, numbered from 1 in that order. Pixels that touch by a face, an edge or a corner belong together.

    Each region is {"id", "voxels", "volume_mm3" for volumes or "area_mm2" for 2D images and one-slice volumes,
    "centroid_lps_mm" (the mean of its pixels' physical points, listed (x, y, z) or (x, y)), "bbox_index"
    ({"min", "max"}: inclusive pixel indices listed (x, y, z) as ITK and Slicer count them), "extent_mm" (the
    bounding box's size along the image axes, (x, y, z))}, plus "max_anomaly" and "mean_anomaly" when `anomaly`
    (the map on the same grid) is given."""
    flagged = np.asarray(detections.array) > 0
    labels, n = ndimage.label(flagged, structure=np.ones((3,) * flagged.ndim, bool))
    if n == 0:
        return []
    geometry = detections.geometry
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(flagged.ndim, flagged.ndim)
    planar = flagged.ndim == 2 or flagged.shape[0] == 1
    pixel_size = float(np.prod(spacing[:2] if planar else spacing))

    where = np.nonzero(labels)  # per array axis (z, y, x): only the flagged pixels, never a full index grid
    which = labels[where]
    counts = np.bincount(which, minlength=n + 1)[1:]
    centroids = np.stack([np.bincount(which, weights=axis, minlength=n + 1)[1:] for axis in where], 1)
    centroids = centroids[:, ::-1] / counts[:, None]  # (x, y, z) index order
    points = np.asarray(geometry.origin) + (centroids * spacing) @ direction.T
    boxes = ndimage.find_objects(labels)
    if anomaly is not None:  # statistics over the flagged voxels only: no full-size copy of the map
        values = np.asarray(anomaly.array)[where].astype(np.float64)
        mean = np.bincount(which, weights=values, minlength=n + 1)[1:] / counts
        order = np.lexsort((values, which))  # by region, then value: each region's last entry is its maximum
        last = np.r_[np.flatnonzero(np.diff(which[order])), len(order) - 1]
        peak = values[order][last]

    regions = []
    for rank, k in enumerate(sorted(range(n), key=lambda k: (-counts[k], k)), start=1):
        low = [s.start for s in boxes[k]][::-1]
        high = [s.stop - 1 for s in boxes[k]][::-1]
        region = {
            "id": rank,
            "voxels": int(counts[k]),
            ("area_mm2" if planar else "volume_mm3"): round(float(counts[k]) * pixel_size, 4),
            "centroid_lps_mm": [round(float(v), 3) for v in points[k]],
            "bbox_index": {"min": [int(v) for v in low], "max": [int(v) for v in high]},
            "extent_mm": [round(float((h - l + 1) * s), 3) for l, h, s in zip(low, high, spacing)],
        }
        if anomaly is not None:
            region.update(max_anomaly=float(peak[k]), mean_anomaly=float(mean[k]))
        regions.append(region)
    return regions
