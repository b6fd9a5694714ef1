"""The bundled reference head (Colin27 at 1.5 mm: head, brain and brain mask, LPS, identity direction) and the
brain-mri model space laid out on it (`model_grid`)."""
from __future__ import annotations

import functools
import math

import numpy as np
import SimpleITK as sitk

from ra_engine.core.image import Geometry
from ra_engine.core.resources import REFERENCES
from ra_engine.preprocess.presets import PresetConfig


@functools.lru_cache(maxsize=4)
def reference_images(name: str) -> dict[str, sitk.Image]:
    """The bundled reference: head, brain and brain mask (1.5 mm, LPS, identity direction), float32/uint8."""
    folder = REFERENCES[name]
    head = sitk.ReadImage(str(folder / "head.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(folder / "brain.nii.gz"), sitk.sitkFloat32)
    brain_mask = sitk.ReadImage(str(folder / "brain_mask.nii.gz"), sitk.sitkUInt8)
    return {"head": head, "brain": brain, "brain_mask": brain_mask}


@functools.lru_cache(maxsize=8)
def model_grid(config: PresetConfig) -> tuple[tuple[int, int, int], Geometry]:
    """The brain-mri model space of `config`: (shape (n_slices, H, W), geometry LPS x-y-z, identity direction).

    In-plane: `image_size` pixels of fov_mm / image_size mm, centred on the reference brain mask's bounding box.
    Through-plane: slices `slice_spacing_mm` apart, centred on the mask's z extent and covering it.
    """
    mask = reference_images(config.reference)["brain_mask"]
    inside = sitk.GetArrayViewFromImage(mask) > 0
    # The mask's bounding box (index x, y, z) from its projections on each axis (no index list of its voxels).
    extent = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    corners = np.array([mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                        for c in ([e[0] for e in extent], [e[-1] for e in extent])])
    low, high = corners.min(0), corners.max(0)
    centre = (low + high) / 2.0
    pixel, dz = config.pixel_mm, config.slice_spacing_mm
    n_slices = int(math.ceil((high[2] - low[2]) / dz - 1e-6)) + 1
    size = config.image_size
    origin = (centre[0] - (size - 1) / 2.0 * pixel, centre[1] - (size - 1) / 2.0 * pixel,
              centre[2] - (n_slices - 1) / 2.0 * dz)
    geometry = Geometry((pixel, pixel, dz), tuple(float(v) for v in origin), tuple(float(v) for v in np.eye(3).ravel()))
    return (n_slices, size, size), geometry


@functools.lru_cache(maxsize=8)
def reference_in_model_space(config: PresetConfig, which: str) -> np.ndarray:
    """The reference's "head", "brain" or "brain_mask" resampled into the model space of `config` (linear;
    nearest for the mask): (n_slices, H, W) float32, read-only."""
    shape, geometry = model_grid(config)
    grid = geometry.apply_to(sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkUInt8))
    interpolator = sitk.sitkNearestNeighbor if which == "brain_mask" else sitk.sitkLinear
    image = sitk.Resample(reference_images(config.reference)[which], grid, sitk.Transform(), interpolator, 0.0,
                          sitk.sitkFloat32)
    result = sitk.GetArrayFromImage(image)
    result.setflags(write=False)
    return result
