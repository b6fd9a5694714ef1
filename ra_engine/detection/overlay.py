"""A quick-look PNG of a result: one slice of the scan with the anomaly map as a heat overlay, the detections'
outline (green) and, where known, the true lesion's outline (cyan), with the research-use notice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from scipy import ndimage

from ra_engine.core.files import atomic_write
from ra_engine.core.image import Image
from ra_engine.models.card import NOTICE


def axial_axis(image: Image) -> int:
    """The array axis (of (z, y, x)) closest to the patient's superior-inferior direction."""
    direction = np.asarray(image.geometry.direction).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(direction[2, :])))


_CROSS = ndimage.generate_binary_structure(2, 1)


def _outline(mask: np.ndarray, mode: str) -> np.ndarray:
    """The outline of a 2D boolean mask, as `skimage.segmentation.find_boundaries(mask, mode=mode)` gives it for a
    binary image (4-connected; pixels beyond the border count as their mirror image, so the border is no edge):
    "outer", the background pixels touching the mask; "inner", the mask's pixels touching the background. Equal to
    skimage's (tested) without importing skimage.segmentation (0.1-0.2 s of a `ra detect` run)."""
    if mode == "outer":
        return ndimage.binary_dilation(mask, _CROSS) & ~mask
    if mode == "inner":
        return mask & ~ndimage.binary_erosion(mask, _CROSS, border_value=1)
    raise ValueError(f"mode must be 'outer' or 'inner', got {mode!r}")


def _per_slice_sums(array: np.ndarray, axis: int) -> np.ndarray:
    """Sum of each slice along `axis`: exact integer sums for integer or boolean maps (no float64 copy of a label
    volume), float64 sums for float maps."""
    array = np.asarray(array)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.sum(axis=tuple(a for a in range(array.ndim) if a != axis), dtype=np.int64)
    return np.moveaxis(np.asarray(array, dtype=float), axis, 0).reshape(array.shape[axis], -1).sum(1)


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
            per_slice = lambda a: _per_slice_sums(a, axis)
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
    rgb[_outline(det > 0, "outer")] = (0.0, 1.0, 0.0)
    if true is not None:
        rgb[_outline(np.asarray(true) > 0, "inner")] = (0.0, 1.0, 1.0)
    picture = PILImage.fromarray((rgb * 255).astype(np.uint8)).resize(
        (rgb.shape[1] * scale, rgb.shape[0] * scale), PILImage.NEAREST)
    ImageDraw.Draw(picture).text((4, 4), NOTICE, fill=(255, 255, 0))
    return atomic_write(path, picture.save, suffix=".png")
