"""The ``xray`` preset: a 2D radiograph -> one model slice (see `preprocess.presets`). The model grid lies in the
radiograph's pixel index frame (x = column, y = row)."""
from __future__ import annotations

import numpy as np

from ra_engine.core.errors import DataError
from ra_engine.core.image import Geometry, Image
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.preprocess.space import ModelSpace, SliceSet


def preprocess_xray(image: Image, config: PresetConfig, mask: Image | None) -> SliceSet:
    from skimage.transform import resize

    array = image.array
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"the xray preset needs a 2D image (or a volume of one slice); got shape {image.array.shape}")
    if not np.all(np.isfinite(array)):
        raise DataError("the radiograph has non-finite pixels (NaN or infinity)")
    h, w = array.shape
    side = max(h, w)
    pad_y, pad_x = (side - h) // 2, (side - w) // 2
    scale = side / config.image_size
    size = config.image_size
    # Model pixel (r, c) covers padded pixels around ((r + 0.5) * scale - 0.5), as skimage's resize samples them.
    offset = 0.5 * scale - 0.5
    geometry = Geometry((scale, scale), (offset - pad_x, offset - pad_y), (1.0, 0.0, 0.0, 1.0))
    space = ModelSpace("xray", (1, size, size), geometry, np.eye(3), tuple(image.array.shape),
                       Geometry.identity(2))

    low_p, high_p = config.percentiles
    high = float(np.percentile(array, high_p))
    low = 0.0 if low_p is None else float(np.percentile(array, low_p))
    if not high > low:
        raise DataError(f"the radiograph has no signal: its {high_p}th percentile is {high:g}, not above {low:g}")
    space.intensity_range = (low, high)
    scaled = np.clip((array.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    padded = np.zeros((side, side), np.float32)
    padded[pad_y:pad_y + h, pad_x:pad_x + w] = scaled
    resized = resize(padded, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    extent = space.from_input_grid(np.ones(image.array.shape, np.uint8), "nearest").astype(bool)
    images = np.where(extent, np.clip(resized, 0.0, 1.0)[None], 0.0).astype(np.float32)
    masks = extent if mask is None else space.from_input_grid(_mask_on_grid(mask, image.array.shape)).astype(bool)
    space.mask = "the whole radiograph" if mask is None else (mask.source or "the given body mask")
    if not masks.any():
        raise DataError("no usable slice: the body mask is empty")
    return SliceSet(images, masks, np.zeros(1, dtype=int), space)


def _mask_on_grid(mask: Image, shape: tuple[int, ...]) -> np.ndarray:
    """A radiograph's body mask (non-zero = body) as uint8 on the radiograph's own pixel grid."""
    if mask.array.size != int(np.prod(shape)) or mask.array.squeeze().shape != tuple(s for s in shape if s != 1):
        raise DataError(f"the radiograph's mask has shape {mask.array.shape}; it must match the image's {shape}")
    return (mask.array != 0).astype(np.uint8).reshape(shape)
