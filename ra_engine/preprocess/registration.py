"""Affine registration of a 3D scan to the reference head (or, for a skull-stripped scan, to the reference brain),
and the checks that the result is anatomy."""
from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import SimpleITK as sitk

from ra_engine.core.errors import DataError
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.preprocess.reference import reference_images

# The registration runs on one thread: ITK's threaded metric sums in a varying order, and the same scan must give
# the same slices every time (training cache, detection); at 4 mm this costs a fraction of a second.
REGISTRATION_THREADS = 1


MAX_AXIS_SCALE = 1.6


def shrink(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The image on a grid of (at least) `spacing_mm` along each axis, same direction and extent, float32,
    smoothed first so that detail finer than the new spacing does not alias."""
    old = np.array(image.GetSpacing())
    new = np.maximum(old, spacing_mm)
    if np.allclose(new, old):
        return sitk.Cast(image, sitk.sitkFloat32)
    sigma = np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355
    as_float = image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)  # no copy
    smooth = sitk.SmoothingRecursiveGaussian(as_float, [float(max(s, 1e-3)) for s in sigma])
    size = np.maximum(np.round(np.array(image.GetSize()) * old / new), 1).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new - old) / 2.0)
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(v) for v in new])
    grid.SetOrigin([float(v) for v in origin])
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def register(small: sitk.Image, config: PresetConfig, skull_stripped: bool) -> tuple[np.ndarray, dict]:
    """Affine (12-DOF) registration of a 3D scan, already brought to the registration grid (`shrink` to
    `registration_spacing_mm`), to the reference head (or to the reference brain, for a skull-stripped scan).

    Returns the 4x4 homogeneous matrix that maps a reference point to the scan's point (LPS, mm), and a report
    (reference used, final metric value, seconds). The centres of mass are matched, then a similarity stage
    (rotation, translation, one scale: well posed even for a head much smaller than the reference) and an affine
    stage each run a `registration_levels`-level pyramid. Mattes mutual information, sampled on a regular grid over
    the reference brain and `registration_margin_mm` around it (skull, scalp, background edge), so that a neck, face
    or field of view cut short does not pull the brain out of place.
    """
    start = time.perf_counter()
    which = "brain" if skull_stripped else "head"
    fixed = reference_for_registration(config.reference, which, config.registration_spacing_mm)
    region = registration_region(config.reference, config.registration_spacing_mm, config.registration_margin_mm)
    moving = _clip_bright(small)
    similarity = sitk.CenteredTransformInitializer(fixed, moving, sitk.Similarity3DTransform(),
                                                   sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity, _ = _run_registration(fixed, moving, region, similarity, config)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine, method = _run_registration(fixed, moving, region, affine, config)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(affine.GetMatrix()).reshape(3, 3)
    centre = np.array(affine.GetCenter())
    matrix[:3, 3] = np.array(affine.GetTranslation()) + centre - matrix[:3, :3] @ centre
    report = {"fixed": which, "metric": round(float(method.GetMetricValue()), 4),
              "seconds": round(time.perf_counter() - start, 3)}
    return matrix, report


@contextlib.contextmanager
def sitk_threads(count: int):
    """SimpleITK's default thread count set to `count` for the duration (the registration's metric follows the
    global default, not the method's own setting)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _clip_bright(image: sitk.Image) -> sitk.Image:
    """Clips the brightest 0.1% (fat, vessels, artefacts) so that they do not take most of the histogram's bins."""
    array = sitk.GetArrayViewFromImage(image)
    high = float(np.percentile(array, 99.9))
    return sitk.Clamp(image, sitk.sitkFloat32, float(array.min()), high)


def _run_registration(fixed: sitk.Image, moving: sitk.Image, region: sitk.Image, initial: sitk.Transform,
                      config: PresetConfig) -> tuple[sitk.Transform, sitk.ImageRegistrationMethod]:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricFixedMask(region)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(config.registration_sampling, config.registration_seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01,
                                                    numberOfIterations=config.registration_iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    factors = [2**k for k in reversed(range(config.registration_levels))]
    method.SetShrinkFactorsPerLevel(factors)
    method.SetSmoothingSigmasPerLevel([float(f - 1) for f in factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    with sitk_threads(REGISTRATION_THREADS):
        transform = method.Execute(fixed, moving)
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1)
    return transform.Downcast(), method


def check_affine(affine: np.ndarray) -> None:
    scales = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if scales.max() > MAX_AXIS_SCALE or scales.min() < 1.0 / MAX_AXIS_SCALE:
        raise DataError("alignment failed: no brain in the model space (the registration to the reference "
                        f"scaled an axis by {scales.max():.2f} or {scales.min():.2f}, beyond anatomy); check that "
                        "the scan is a head T1")


@functools.lru_cache(maxsize=8)
def reference_for_registration(name: str, which: str, spacing_mm: float) -> sitk.Image:
    return shrink(reference_images(name)[which], spacing_mm)


@functools.lru_cache(maxsize=8)
def registration_region(name: str, spacing_mm: float, margin_mm: float) -> sitk.Image:
    """The reference brain mask dilated by `margin_mm`, on the registration grid (uint8)."""
    grid = reference_for_registration(name, "head", spacing_mm)
    mask = sitk.Resample(reference_images(name)["brain_mask"], grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)
    radius = int(round(margin_mm / spacing_mm))
    return sitk.BinaryDilate(mask, [radius] * 3) if radius > 0 else mask
