"""The ``brain-mri`` preset for one axial 2D slice of a brain (a picture without geometry, e.g. the OASIS and ANTsPy
slice collections): the slice is placed in the same model space as a 3D scan, so that 2D slice collections and 3D
volumes train one model (docs/METHOD.md, "Data and model space").

The slice is registered in 2D to the axial levels of the reference brain (Colin27): for every level that holds
brain, an affine that matches the slice's brain to the level's (their centres and second moments) is scored by the
rank correlation of the two inside the reference brain; the best few are refined by an affine registration (Mattes
mutual information) and the level whose registered slice correlates best is kept. The slice is then resampled onto
that level's model grid, scaled by the 0.5-99.5 percentiles of its brain like a 3D scan, and is 0 outside it. The
model grid lies in the slice's pixel index frame (x = column, y = row), as for radiographs.

Assumed, as for the 3D path's output: a skull-stripped axial slice, anterior up, on a dark background; its pixel
size need not be known (the affine finds it) and its left and right may be either way (training flips brain slices).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ra_engine.core.errors import DataError
from ra_engine.core.image import Geometry, Image
from ra_engine.preprocess.brain import MIN_REFERENCE_CORRELATION, rank_correlation
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.preprocess.reference import model_grid, reference_images
from ra_engine.preprocess.registration import sitk_threads
from ra_engine.preprocess.space import ModelSpace, SliceSet

# The registration works on the reference at this pixel size (mm): the paper's 233 mm / 128 px, finer than a 64-px
# model's grid, so that small models get their slices placed as precisely as large ones.
REGISTRATION_PIXEL_MM = 233.0 / 128
# Levels with less brain than this share of the largest level's are not candidates (the tips of the brain).
MIN_LEVEL_AREA = 0.2
# Levels refined by a registration, the best by their moment match.
REFINED_LEVELS = 4
# A slice's foreground: above this share of its 99th percentile (skull-stripped slices lie on a black background).
FOREGROUND_SHARE = 0.08


def preprocess_brain_slice(image: Image, config: PresetConfig, mask: Image | None) -> SliceSet:
    """One axial brain slice (y, x) or (1, y, x) -> one model-space slice at the reference level it matches."""
    array = image.array[0] if image.array.ndim == 3 and image.array.shape[0] == 1 else image.array
    if array.ndim != 2:
        raise DataError(f"a brain slice is a 2D image; got shape {image.array.shape}")
    if not np.all(np.isfinite(array)):
        raise DataError("the slice has non-finite pixels (NaN or infinity)")
    moving = np.asarray(array, dtype=np.float32)
    brain = _foreground(moving) if mask is None else _user_mask(mask, moving.shape)
    if brain.sum() < 64:
        raise DataError("no brain in the slice: too few foreground pixels (a brain-mri model takes 3D head MRI "
                        "volumes or skull-stripped axial T1 slices: for a radiograph, use an xray model)")
    plane = _Plane(moving, brain)
    candidates = _candidates(config, plane)
    refined = [_refine(config, plane, level, initial) for level, initial, _ in candidates[:REFINED_LEVELS]]
    level, transform, correlation = max(refined, key=lambda r: r[2])
    if not correlation >= MIN_REFERENCE_CORRELATION:
        raise DataError(f"alignment failed: the slice does not look like an axial slice of the reference T1 brain "
                        f"(best correlation {correlation:.2f} < {MIN_REFERENCE_CORRELATION}); a brain-mri model "
                        "takes 3D head MRI volumes or skull-stripped axial T1 slices: for a radiograph, use an xray "
                        "model")

    shape, grid = model_grid(config)
    size, pixel = config.image_size, config.pixel_mm
    geometry = Geometry((pixel, pixel), grid.origin[:2], (1.0, 0.0, 0.0, 1.0))
    z_mm = grid.origin[2] + level * grid.spacing[2]
    space = ModelSpace("brain-slice", (1, size, size), geometry, _matrix(transform), tuple(image.array.shape),
                       Geometry.identity(2), alignment={"level": int(level), "reference_z_mm": round(z_mm, 3),
                                                        "reference_correlation": round(correlation, 4)},
                       mask="the slice's foreground" if mask is None else (mask.source or "the given brain mask"))
    inside = space.from_input_grid(brain.astype(np.uint8).reshape(image.array.shape), "nearest").astype(bool)
    values = space.from_input_grid(moving.reshape(image.array.shape), "linear")
    low_p, high_p = config.percentiles
    high = float(np.percentile(values[inside], high_p)) if inside.any() else 0.0
    low = 0.0 if low_p is None else float(np.percentile(values[inside], low_p))
    if not high > low:
        raise DataError("no brain in the model space: the slice's brain has no contrast")
    high = low + (high - low) / config.headroom  # the high percentile maps to `headroom`
    space.intensity_range = (low, high)
    scaled = np.where(inside, np.clip((values - low) / (high - low), 0.0, 1.0), 0.0).astype(np.float32)
    return SliceSet(scaled, inside, np.zeros(1, dtype=int), space)


def _foreground(array: np.ndarray) -> np.ndarray:
    """The slice's brain: pixels above FOREGROUND_SHARE of the 99th percentile, the largest component, holes filled."""
    high = float(np.percentile(array, 99.0))
    if not high > float(array.min()):
        raise DataError("the slice is constant: there is no brain to align")
    labels, n = ndimage.label(array > float(array.min()) + FOREGROUND_SHARE * (high - float(array.min())))
    if n == 0:
        return np.zeros(array.shape, bool)
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(labels == largest)


def _user_mask(mask: Image, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(mask.array).reshape(-1, *mask.array.shape[-2:])[0] if mask.array.ndim == 3 else mask.array
    if array.shape != shape:
        raise DataError(f"the slice's brain mask has shape {mask.array.shape}; it must match the slice's {shape}")
    return np.asarray(array) != 0


class _Plane:
    """The slice prepared for registration: its pixels clipped of their brightest 0.5% (edge artefacts), its brain,
    their centre and second moments (pixel frame, (x, y))."""

    def __init__(self, array: np.ndarray, brain: np.ndarray):
        top = float(np.percentile(array[brain], 99.5))
        self.array = np.where(brain, np.minimum(array, top), 0.0).astype(np.float32)
        self.brain = brain
        self.centre, self.covariance = _moments(brain, (1.0, 1.0), (0.0, 0.0))
        self.image = sitk.GetImageFromArray(self.array)


def _moments(mask: np.ndarray, spacing, origin) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) and covariance of a 2D mask's pixels in physical units."""
    ys, xs = np.nonzero(mask)
    points = np.stack([origin[0] + xs * spacing[0], origin[1] + ys * spacing[1]], 1).astype(np.float64)
    return points.mean(0), np.cov(points.T)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.maximum(values, 1e-9))) @ vectors.T


@functools.lru_cache(maxsize=4)
def _levels(config: PresetConfig) -> tuple[list[sitk.Image], list[np.ndarray], list[np.ndarray]]:
    """The reference brain and its mask on each axial level of `config`'s model space, at REGISTRATION_PIXEL_MM:
    2D SimpleITK images (x, y in mm, LPS) and their arrays."""
    shape, grid = model_grid(config)
    extent = config.fov_mm
    size = int(round(extent / REGISTRATION_PIXEL_MM))
    origin = (grid.origin[0] - 0.5 * grid.spacing[0] + 0.5 * REGISTRATION_PIXEL_MM,
              grid.origin[1] - 0.5 * grid.spacing[1] + 0.5 * REGISTRATION_PIXEL_MM)
    reference = reference_images(config.reference)
    images, arrays, masks = [], [], []
    for level in range(shape[0]):
        z = grid.origin[2] + level * grid.spacing[2]
        plane = sitk.Image([size, size, 1], sitk.sitkFloat32)
        plane.SetSpacing([REGISTRATION_PIXEL_MM, REGISTRATION_PIXEL_MM, 1.0])
        plane.SetOrigin([origin[0], origin[1], z])
        brain = sitk.GetArrayFromImage(sitk.Resample(reference["brain"], plane, sitk.Transform(), sitk.sitkLinear,
                                                     0.0, sitk.sitkFloat32))[0]
        mask = sitk.GetArrayFromImage(sitk.Resample(reference["brain_mask"], plane, sitk.Transform(),
                                                    sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))[0] > 0
        image = sitk.GetImageFromArray(brain)
        image.SetSpacing([REGISTRATION_PIXEL_MM] * 2)
        image.SetOrigin(origin)
        images.append(image)
        arrays.append(brain)
        masks.append(mask)
    return images, arrays, masks


def _candidates(config: PresetConfig, plane: _Plane) -> list[tuple[int, sitk.AffineTransform, float]]:
    """(level, moment-matching affine, rank correlation) of every level with enough brain, best first."""
    images, arrays, masks = _levels(config)
    areas = np.array([m.sum() for m in masks], dtype=float)
    found = []
    for level in np.flatnonzero(areas >= MIN_LEVEL_AREA * areas.max()):
        fixed = images[level]
        centre, covariance = _moments(masks[level], fixed.GetSpacing(), fixed.GetOrigin())
        matrix = _sqrtm(plane.covariance) @ np.linalg.inv(_sqrtm(covariance))
        transform = sitk.AffineTransform(2)
        transform.SetMatrix([float(v) for v in matrix.ravel()])
        transform.SetCenter([float(v) for v in centre])
        transform.SetTranslation([float(v) for v in plane.centre - centre])
        found.append((int(level), transform, _correlation(plane, fixed, arrays[level], masks[level], transform)))
    if not found:
        raise DataError("the reference has no brain in its model space: check the preset")
    return sorted(found, key=lambda f: -f[2])


def _correlation(plane: _Plane, fixed: sitk.Image, reference: np.ndarray, mask: np.ndarray,
                 transform: sitk.Transform) -> float:
    """Rank correlation of the slice mapped onto a reference level and the level, inside the reference brain."""
    moved = sitk.GetArrayFromImage(sitk.Resample(plane.image, fixed, transform, sitk.sitkLinear, 0.0,
                                                 sitk.sitkFloat32))
    return rank_correlation(moved[mask], reference[mask])


def _refine(config: PresetConfig, plane: _Plane, level: int, initial: sitk.AffineTransform):
    """(level, registered affine, rank correlation) of the slice registered to one reference level."""
    images, arrays, masks = _levels(config)
    fixed = images[level]
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.005, numberOfIterations=100,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(sitk.AffineTransform(initial), inPlace=False)
    with sitk_threads(1):  # the same slice gives the same placement every time
        transform = method.Execute(fixed, sitk.Cast(plane.image, sitk.sitkFloat32))
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1)
    transform = transform.Downcast()
    scales = np.linalg.svd(np.asarray(transform.GetMatrix()).reshape(2, 2), compute_uv=False)
    if not math.isfinite(scales.max()) or scales.max() / max(scales.min(), 1e-9) > 2.0:
        return level, initial, -1.0  # a degenerate fit: the level is not this slice's
    return level, transform, _correlation(plane, fixed, arrays[level], masks[level], transform)


def _matrix(transform: sitk.AffineTransform) -> np.ndarray:
    """The 3x3 homogeneous matrix of a 2D affine (reference plane mm -> slice pixel frame)."""
    matrix = np.eye(3)
    matrix[:2, :2] = np.asarray(transform.GetMatrix()).reshape(2, 2)
    centre = np.asarray(transform.GetCenter())
    matrix[:2, 2] = np.asarray(transform.GetTranslation()) + centre - matrix[:2, :2] @ centre
    return matrix
