"""A quick-look PNG of a result: one slice of the scan with the anomaly map as a heat overlay, the detections'
outline (green) and, where known, the true lesion's outline (cyan), with the research-use notice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage, ImageDraw
from skimage.segmentation import find_boundaries

from .atomic import atomic_write
from .image import Image
from .card import NOTICE


def axial_axis(image: Image) -> int:
    """The array axis (of (z, y, x)) closest to the patient's superior-inferior direction."""
    direction = np.asarray(image.geometry.direction).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(direction[2, :])))


def _heat(t: np.ndarray) -> np.ndarray:
    """'hot' colours for t in [0, 1]: black-red-yellow-white, (..., 3) in [0, 1]."""
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)


def overlay_png(scan: Image, anomaly: Image, detections: Image, path: Path, truth: np.ndarray | None = None,
                index: int | None = None, scale: int = 3) -> Path:
    """Writes the overlay of slice `index` (default: the slice with most true lesion, else most detections, else
    the highest anomaly) along the axial axis of a volume, or of the 2D image itself."""
    arrays = [scan.array, anomaly.array, detections.array, truth if truth is not None else None]
    if scan.is_volume:
        axis = axial_axis(scan)
        if index is None:
            per_slice = lambda a: np.moveaxis(np.asarray(a, dtype=float), axis, 0).reshape(a.shape[axis], -1).sum(1)
            key = truth if truth is not None and np.any(truth) else (
                detections.array if detections.array.any() else anomaly.array)
            index = int(np.argmax(per_slice(key)))
        arrays = [None if a is None else np.take(a, index, axis=axis) for a in arrays]
    grey, amap, det, true = arrays
    lo, hi = np.percentile(grey, (1, 99))
    rgb = np.repeat(np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1)[..., None], 3, axis=-1)
    top = float(np.percentile(amap[amap > 0], 99.5)) if np.any(amap > 0) else 1.0
    t = np.clip(amap / max(top, 1e-12), 0, 1)
    alpha = (0.7 * t)[..., None]
    rgb = rgb * (1 - alpha) + _heat(t) * alpha
    rgb[find_boundaries(det > 0, mode="outer")] = (0.0, 1.0, 0.0)
    if true is not None:
        rgb[find_boundaries(np.asarray(true) > 0, mode="inner")] = (0.0, 1.0, 1.0)
    picture = PILImage.fromarray((rgb * 255).astype(np.uint8)).resize(
        (rgb.shape[1] * scale, rgb.shape[0] * scale), PILImage.NEAREST)
    ImageDraw.Draw(picture).text((4, 4), NOTICE, fill=(255, 255, 0))
    return atomic_write(path, picture.save, suffix=".png")
