"""The ``brain-mri`` preset: a 3D T1 -> model-space axial slices of its brain (see `preprocess.presets`).

Skull-stripped scans: a brain-only scan registered to a head with its skull would be stretched to fill the skull,
so such scans are registered to the reference *brain* instead. `preprocess(..., skull_stripped=None)` decides by
the scan's foreground volume (`is_skull_stripped`: under 2.5 litres is a brain, a head is 3-5 litres); pass True
or False where a scan's field of view holds only part of the head. After alignment the result is checked (the
reference brain must lie mostly inside the scan, no axis scaled beyond 1.6, and the aligned brain must correlate
in rank with the reference brain); a failure raises DataError("alignment failed: ...") rather than returning
slices of something that is not a brain.

The model space of ``brain-mri`` has identity direction, so a model slice (y, x) has the patient's anterior at row 0
and the patient's right at column 0 (radiological view), and slice index grows from inferior to superior."""
from __future__ import annotations

import math
import time

import numpy as np
import SimpleITK as sitk

from ra_engine.core.errors import DataError
from ra_engine.core.image import Image
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.preprocess.reference import model_grid, reference_in_model_space
from ra_engine.preprocess.registration import check_affine, register, shrink
from ra_engine.preprocess.space import ModelSpace, SliceSet

# A skull-stripped T1 is a brain on an empty background (measured 1.65 l for the ITK subject, 1.94-2.05 l for the
# MNI-sized templates); a T1 with its skull is a head (3.1 l for the ITK subject, 4.3 l for Colin27).
SKULL_STRIPPED_MAX_LITRES = 2.5


# Alignment checks: inside the reference brain, an aligned T1 correlates (in rank) with the reference (measured
# 0.53 for the ITK subject with its bias field, 0.68-0.72 for the MNI templates; 0.0-0.08 for noise, smooth noise,
# a ball, a ball in a shell), and no axis of a head is scaled by more than MAX_AXIS_SCALE.
MIN_REFERENCE_CORRELATION = 0.2


# At least half of the reference brain must lie inside the scan's field of view.
MIN_BRAIN_IN_FIELD = 0.5
# A brain mask holds a brain: 1-2 litres in adults (0.4 l at birth); a smaller mask is taken for a lesion mask.
MIN_BRAIN_MASK_LITRES = 0.3


def is_skull_stripped(image: Image) -> bool:
    """Whether a 3D T1 (z, y, x) looks brain-only: its foreground (above 10% of the range from the minimum to the
    99th percentile, closed, holes filled) is smaller than 2.5 litres. A head with its skull and scalp is 3-5
    litres, a brain 1.0-2.0 litres. A scan whose field of view holds only part of the head can be misjudged: pass
    `skull_stripped` to `preprocess` then."""
    return foreground_litres(shrink(image.to_sitk(), 4.0)) < SKULL_STRIPPED_MAX_LITRES


def foreground_litres(image: sitk.Image) -> float:
    array = sitk.GetArrayFromImage(image)
    floor = float(array.min())
    threshold = floor + 0.1 * (float(np.percentile(array, 99.0)) - floor)
    foreground = sitk.BinaryThreshold(image, threshold, 1e30, 1, 0)
    foreground = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(foreground, [2, 2, 2]))
    return float(sitk.GetArrayViewFromImage(foreground).sum()) * float(np.prod(image.GetSpacing())) / 1e6


def preprocess_brain(image: Image, config: PresetConfig, mask: Image | None, training: bool,
                      skull_stripped: bool | None) -> SliceSet:
    if image.array.ndim != 3 or min(image.array.shape) < 2:
        raise DataError(f"the brain-mri preset needs a 3D volume; got an array of shape {image.array.shape}")
    array = image.array
    if not np.all(np.isfinite(array)):
        raise DataError("the scan has non-finite voxels (NaN or infinity)")
    if float(array.max()) - float(array.min()) <= 0:
        raise DataError("the scan is constant: there is no anatomy to align or score")
    start = time.perf_counter()
    scan_image = image.to_sitk()  # float32 on the input's grid: shrunk for the registration, resampled below
    small = shrink(scan_image, config.registration_spacing_mm)
    if skull_stripped is None:
        skull_stripped = foreground_litres(small) < SKULL_STRIPPED_MAX_LITRES
    shape, geometry = model_grid(config)
    if config.align:
        affine, alignment = register(small, config, skull_stripped)
        check_affine(affine)
    else:
        affine, alignment = np.eye(4), {"fixed": None}
    space = ModelSpace("brain-mri", shape, geometry, affine, tuple(array.shape), image.geometry,
                       skull_stripped=bool(skull_stripped), alignment=alignment)

    # One resampling gives both the scan and its field of view: model voxels whose point falls outside the input's
    # grid get NaN (ITK's "inside the buffer" test is the same for the linear and the nearest interpolator, so this
    # equals resampling a volume of ones by nearest neighbour), and 0 like before once the field is known.
    scan = space._from_input_image(scan_image if scan_image.GetPixelID() == sitk.sitkFloat32
                                   else sitk.Cast(scan_image, sitk.sitkFloat32), "linear", fill=math.nan)
    del scan_image
    in_field = ~np.isnan(scan)
    scan[~in_field] = 0.0
    if mask is None:
        brain = reference_in_model_space(config, "brain_mask") > 0
        space.mask = f"the reference brain ({config.reference})"
    else:
        _check_brain_sized(mask)
        brain = _mask_in_model_space(mask, space)
        space.mask = mask.source or "the given brain mask"
    if not brain.any():
        raise DataError("the brain mask is empty in the model space: is the mask on this scan's anatomy?")
    inside = brain & in_field
    covered = inside.sum() / brain.sum()
    if covered < MIN_BRAIN_IN_FIELD:
        raise DataError(f"alignment failed: no brain in the model space (only {covered:.0%} of the brain lies "
                        "inside the scan's field of view); check that the scan is a head T1")
    if config.align:
        reference = reference_in_model_space(config, "brain" if skull_stripped else "head")
        correlation = rank_correlation(scan[inside], reference[inside])
        space.alignment["reference_correlation"] = round(correlation, 4)
        if not correlation >= MIN_REFERENCE_CORRELATION:
            raise DataError(f"alignment failed: no brain in the model space (the aligned scan does not look like "
                            f"the reference T1 brain: correlation {correlation:.2f} < {MIN_REFERENCE_CORRELATION}); "
                            "check that the scan is a T1 of a head, or pass a brain mask")

    low_p, high_p = config.percentiles
    values = scan[inside]
    high = float(np.percentile(values, high_p))
    low = 0.0 if low_p is None else float(np.percentile(values, low_p))
    if not high > low:
        raise DataError("no brain in the model space: the brain has no contrast (its intensity percentiles "
                        f"{low_p} and {high_p} are equal)")
    high = low + (high - low) / config.headroom  # the high percentile maps to `headroom`
    space.intensity_range = (low, high)
    space.alignment["seconds_total"] = round(time.perf_counter() - start, 3)
    images = np.where(inside, np.clip((scan - low) / (high - low), 0.0, 1.0), 0.0).astype(np.float32)
    return _slice_set(images, inside, space, config, training)


def _check_brain_sized(mask: Image) -> None:
    """DataError, naming the mask's file, when a brain mask covers far less than a brain (1-2 litres): a lesion mask
    stored as `<name>_mask` must not silently become the brain mask."""
    voxels = int(np.count_nonzero(mask.array))
    litres = voxels * float(np.prod(mask.geometry.spacing)) / 1e6
    if litres < MIN_BRAIN_MASK_LITRES:
        raise DataError(f"the brain mask {mask.source or '(given as an array)'} covers {litres:.3f} litres, far less "
                        f"than a brain (1 to 2 litres): it looks like a lesion mask, not a brain mask. Give a brain "
                        f"mask, or none (the reference brain is then used)")


def _mask_in_model_space(mask: Image, space: ModelSpace) -> np.ndarray:
    """A user mask (any grid, LPS geometry, non-zero = inside) in model space by nearest neighbour."""
    moving = Image((mask.array != 0).astype(np.uint8), mask.geometry).to_sitk()
    n, h, w = space.shape
    reference = space.geometry.apply_to(sitk.Image([w, h, n], sitk.sitkUInt8))
    mapped = sitk.Resample(moving, reference, space._transform(inverse=False), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    return sitk.GetArrayFromImage(mapped) > 0


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long samples: monotonic intensity changes (contrast, gamma)
    leave it unchanged, and it is not dominated by a few bright voxels."""
    ranks = [_ranks(v) for v in (a, b)]
    x, y = (r - r.mean() for r in ranks)
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks of `values` (ties in order of position), float64: the inverse of the stable sorting
    permutation, equal to argsort(argsort(values, stable), stable) with one sort instead of two."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(order.size, np.float64)
    ranks[order] = np.arange(order.size, dtype=np.float64)
    return ranks


def _slice_set(images: np.ndarray, masks: np.ndarray, space: ModelSpace, config: PresetConfig,
               training: bool) -> SliceSet:
    fractions = masks.reshape(masks.shape[0], -1).mean(1)
    if training:
        positions = np.flatnonzero(fractions >= max(config.min_foreground, 1e-12))
    else:
        positions = np.arange(masks.shape[0])
    if positions.size == 0 or not masks[positions].any():
        raise DataError(f"no usable slice: no slice has at least {config.min_foreground:.0%} foreground")
    return SliceSet(images[positions], masks[positions], positions, space)
